"""Request bodies are parsed as JSON (RFC 8259) strictly, before any schema sees them.

Python's ``json`` accepts more than JSON does, and each extra later became a 500 or a silent
change: ``NaN``, ``Infinity`` and ``-Infinity`` (and numbers such as ``1e400`` that overflow to
infinity) pass float fields and were stored as ``null``; a ``"\\ud800"`` escape decodes to a lone
surrogate, which no UTF-8 encoder (the store's, the response's) can write, so the request failed
after the dataset row was stored and every later listing failed with it; integers past 64 bits
overflow the store's columns. Free-form parts of a body (dataset rows, metadata) have no schema to
catch these, so one check on the decoded document covers every field of every body: a refusal
is a 400 Problem naming the field (``source.rows.0.input_query``), raised before the handler runs,
so nothing is created.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from posttrain.api.problems import printable

#: The deepest nesting a body may have (a chat row with tool calls is under 10 levels deep).
MAX_DEPTH = 64
#: Integers must fit a signed 64-bit column (the store's, and most clients' JSON readers).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")


class _NonFinite:
    """What ``NaN``, ``Infinity`` or ``-Infinity`` parse to, so the check can name their field."""

    def __init__(self, name: str) -> None:
        self.name = name


def _where(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path) or "body"


def hostile_value(document: Any) -> tuple[str, str] | None:
    """The first field (in document order) that JSON cannot carry safely, and why; None if none.

    Iterative, so a deep document cannot exhaust the stack here.
    """
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(document, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return _where(path), (f"contains a lone surrogate ({printable(_SURROGATE.findall(value)[0])}), "
                                      "which is not a character; send valid Unicode")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                return _where(path), f"integer out of range (must lie between -2^63 and 2^63-1, got {len(str(value))} digits)"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return _where(path), "must be a finite number (JSON has no NaN or Infinity, and this overflows to one)"
        elif isinstance(value, _NonFinite):
            return _where(path), f"must be a finite number (JSON has no {value.name})"
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                return _where(path), f"nested too deeply (at most {MAX_DEPTH} levels)"
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            for key, item in reversed(items):
                if isinstance(key, str) and _SURROGATE.search(key):
                    return _where((*path, printable(key))), "the key contains a lone surrogate; send valid Unicode"
                stack.append((item, (*path, key), depth + 1))
    return None


def _refused(where: str, why: str) -> HTTPException:
    return HTTPException(status_code=400, detail=f"{where}: {why}")


def parse_body(body: bytes) -> Any:
    """The decoded JSON document, or a 400 ``HTTPException`` naming what is wrong and where.

    A syntax error stays a ``json.JSONDecodeError``, which FastAPI answers with a 400 already.
    """
    try:
        text = body.decode(json.detect_encoding(body))
    except UnicodeDecodeError as exc:
        raise _refused("body", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        document = json.loads(text, parse_constant=_NonFinite)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _refused("body", f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer with more digits than Python converts
        raise _refused("body", f"a number is too long ({exc})") from None
    found = hostile_value(document)
    if found is not None:
        raise _refused(*found)
    return document


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body goes through ``parse_body`` (use as an ``APIRouter``'s ``route_class``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
