"""Every error leaves as an RFC 7807 body: ``{"status", "title", "detail", "instance"?}``, except
on the OpenAI fine-tuning paths (``/v1/files``, ``/v1/fine_tuning``), where it leaves as OpenAI's
envelope ``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` SDK parses.

``problem`` decides by the request's path, here and only here, so every refusal (the gate's, a
route's, a validation error) speaks the dialect of the API it was sent to.

One handler per kind of failure: our ``ServiceError`` tree (MRO lookup covers subclasses),
request validation (400 naming the field, instead of FastAPI's 422 list), Starlette's own HTTP
errors (unknown route, wrong method), and anything unexpected (500, no internals leaked).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from posttrain.errors import RecipeInvalid, ServiceError

log = logging.getLogger("posttrain.api")


def printable(text: str) -> str:
    """``text`` safe to put in a UTF-8 answer: any lone surrogate written as a ``\\udXXX`` escape.

    A detail often quotes the client's own text; one that cannot be encoded would turn the
    refusal itself into a 500.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: Path prefixes that belong to the OpenAI fine-tuning, models and inference APIs: their errors use OpenAI's envelope.
OPENAI_PREFIXES = ("/v1/files", "/v1/fine_tuning", "/v1/models", "/v1/chat", "/v1/completions")

#: OpenAI's error ``type`` and default ``code`` for each status (docs/openai-api.md).
OPENAI_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    421: ("invalid_request_error", "misdirected_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error envelope, as the ``openai`` SDK parses it."""

    error: OpenAIErrorDetail


#: The refusals any OpenAI operation may answer with, so the OpenAPI document tells the truth.
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": description}
    for code, description in (
        (400, "The request was invalid or malformed"),
        (401, "A valid API key is required"),
        (404, "No such file, job, model or endpoint"),
        (409, "The request conflicts with the current state"),
        (413, "The request body is too large"),
        (429, "Too many requests, or too many queued jobs"),
        (500, "The server encountered an unexpected error"),
    )
}


def speaks_openai(path: str | None) -> bool:
    """Whether ``path`` is on the OpenAI fine-tuning API (``/v1/files…``, ``/v1/fine_tuning/…``)."""
    if not path:
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PREFIXES)


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """OpenAI's error envelope for a refusal with this status."""
    kind, default_code = OPENAI_ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                         None))
    return {"error": {"message": printable(message), "type": kind, "param": param, "code": code or default_code}}


def problem(status: int, detail: str, *, title: str | None = None, instance: str | None = None,
            headers: dict[str, str] | None = None, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error answer for ``instance`` (the request's path): RFC 7807, or OpenAI's envelope on
    its paths (``param`` and ``code`` appear only there)."""
    body: dict[str, object]
    if speaks_openai(instance):
        body = openai_error(status, detail, param=param, code=code)
    else:
        body = {"status": status, "title": title or HTTPStatus(status).phrase, "detail": printable(detail)}
        if instance:
            body["instance"] = printable(instance)
    if 400 <= status < 500 and status not in (408, 429):
        # The official clients retry 409s (and more) by default; a refusal will not change on retry.
        headers = {**(headers or {}), "x-should-retry": "false"}
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Discriminated unions add the tag as a path element (e.g. source.rows.rows); keep it readable.
    return ".".join(parts) or "body"


def first_invalid_field(exc: RequestValidationError) -> str | None:
    """The first invalid field of a request, spelled as the client sent it (OpenAI's ``param``)."""
    errors = exc.errors()
    if not errors:
        return None
    # A union adds its member's tag to the path (n_epochs.int, n_epochs.literal['auto']): not a field.
    loc = tuple(part for part in errors[0].get("loc", ()) if not _is_union_tag(part))
    where = _location(loc)
    return None if where == "body" else where


_UNION_TAGS = frozenset({"int", "float", "str", "bool", "none", "dict", "list", "constrained-int", "constrained-float"})


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("literal[", "function-")))


def describe_validation_error(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors()[:5]:
        where = _location(tuple(error.get("loc", ())))
        if error.get("type") == "missing":
            messages.append(f"{where}: field required")
        elif error.get("type") == "extra_forbidden":
            messages.append(f"{where}: unexpected field")
        elif error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error") or error.get("msg")
            position = [p for p in error.get("loc", ()) if isinstance(p, int)]
            messages.append(f"body: not valid JSON ({reason}{f' at character {position[0]}' if position else ''})")
        else:
            messages.append(f"{where}: {error.get('msg')}")
    more = len(exc.errors()) - 5
    if more > 0:
        messages.append(f"and {more} more error(s)")
    return "; ".join(messages) or "the request was invalid"


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if exc.status_code >= 500:
            log.error("service error: %s", exc.detail, extra={"action": "service_error"})
        # OpenAI's ``param``: a refusal's own, else the recipe field a door renamed.
        param = getattr(exc, "param", None) or (exc.field if isinstance(exc, RecipeInvalid) else None)
        return problem(exc.status_code, exc.detail, title=exc.title, instance=request.url.path, headers=headers,
                       param=param, code=getattr(exc, "code", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(400, describe_validation_error(exc), instance=request.url.path, param=first_invalid_field(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            # One path may be served by several routes (GET and POST /v1/datasets): list them all.
            allowed = _allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        return problem(exc.status_code, detail, instance=request.url.path, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc,
                  extra={"action": "unhandled_error"})
        return problem(500, "An unexpected error occurred; the server log has the details.", instance=request.url.path)
