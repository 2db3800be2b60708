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

A big body (a registration with a million rows) takes seconds to decode and check, so past
``OFF_LOOP_BYTES`` both run in a worker thread: the event loop, which answers every other request
(``/healthz`` included), never waits on them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from posttrain.api.problems import printable

#: The deepest nesting a body may have (a chat row with tool calls is under 10 levels deep).
MAX_DEPTH = 64
#: Integers must fit a signed 64-bit column (the store's, and most clients' JSON readers).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Bodies larger than this are parsed in a worker thread (a smaller one parses in well under a
#: millisecond, less than the hand-off to a thread costs).
OFF_LOOP_BYTES = 64 * 1024

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


def _yielding_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Builds each object as ``json`` would; being Python, not C, each call lets the interpreter hand
    the GIL to the event loop's thread (one ``json.loads`` call in C holds it for seconds on a big body)."""
    return dict(pairs)


_collector_pauses = 0
_collector_was_enabled = True
_collector_lock = threading.Lock()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a big document is built (by any number of threads).

    A JSON document holds no reference cycles, so reference counting frees it; but building one
    of millions of objects sets off full collections, each walking every object in the process
    while holding the GIL: a 40 MB body stalled the event loop for 1.5 s at a time in them.
    """
    global _collector_pauses, _collector_was_enabled
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_enabled:
                gc.enable()


def parse_body_off_loop(body: bytes) -> Any:
    """``parse_body`` for a worker thread: it lets the event loop's thread run meanwhile."""
    with _collector_paused():
        return parse_body(body, yielding=True)


def parse_body(body: bytes, *, yielding: bool = False) -> Any:
    """The decoded JSON document, or a 400 ``HTTPException`` naming what is wrong and where.

    A syntax error stays a ``json.JSONDecodeError``, which FastAPI answers with a 400 already.
    ``yielding``: parse so that other threads (the event loop) keep running (see ``parse_body_off_loop``).
    """
    try:
        text = body.decode(json.detect_encoding(body))
    except UnicodeDecodeError as exc:
        raise _refused("body", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        document = json.loads(text, parse_constant=_NonFinite, object_pairs_hook=_yielding_object if yielding else None)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _refused("body", f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer with more digits than Python converts
        raise _refused("body", f"a number is too long ({exc})") from None
    found = hostile_value(document)
    if found is not None:
        if yielding:
            _dismantle(document)
        raise _refused(*found)
    return document


def _dismantle(document: Any) -> None:
    """Free a refused document a container at a time: dropped whole, its millions of objects are
    freed in one C call that holds the GIL (a second and more on a 40 MB body)."""
    stack = [document] if isinstance(document, dict | list) else []
    while stack:
        value = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        stack.extend(child for child in children if isinstance(child, dict | list))
        value.clear()


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= OFF_LOOP_BYTES:
                self._json = parse_body(body)
            else:
                self._json = await run_in_threadpool(parse_body_off_loop, body)
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body goes through ``parse_body`` (use as an ``APIRouter``'s ``route_class``).

    A request announcing a body over ``OFF_LOOP_BYTES`` is read on the event loop (its receive
    channel belongs there) and then handled whole in a worker thread with an event loop of its own,
    the cycle collector paused: parsing, the schema's validation, the handler and rendering the
    answer each hold the GIL for long stretches on such a body, and on the server's loop every
    other request would wait.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            if not _announces_big_body(request):
                return await handler(strict)
            strict._body = await request.body()
            return await run_in_threadpool(_handle_off_loop, handler, strict)

        return strict_handler


def _handle_off_loop(handler: Callable[[Request], Coroutine[Any, Any, Response]], request: Request) -> Response:
    with _collector_paused():
        try:
            return asyncio.run(handler(request))
        finally:
            vars(request).pop("_json", None)  # freed here, not when the loop drops the request


def _announces_big_body(request: Request) -> bool:
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > OFF_LOOP_BYTES
