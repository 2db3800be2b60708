"""Every error leaves as an RFC 7807 body: ``{"status", "title", "detail", "instance"?}``.

One handler per kind of failure: our ``ServiceError`` tree (MRO lookup covers subclasses),
request validation (400 naming the field, instead of FastAPI's 422 list), Starlette's own HTTP
errors (unknown route, wrong method), and anything unexpected (500, no internals leaked).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from posttrain.errors import RateLimited, ServiceError, StoreUnavailable

log = logging.getLogger("posttrain.api")


def printable(text: str) -> str:
    """``text`` safe to put in a UTF-8 answer: any lone surrogate written as a ``\\udXXX`` escape.

    A detail often quotes the client's own text; one that cannot be encoded would turn the
    refusal itself into a 500.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def problem(status: int, detail: str, *, title: str | None = None, instance: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, object] = {
        "status": status,
        "title": title or HTTPStatus(status).phrase,
        "detail": printable(detail),
    }
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
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited | StoreUnavailable) else None
        if exc.status_code >= 500:
            log.error("service error: %s", exc.detail, extra={"action": "service_error"})
        return problem(exc.status_code, exc.detail, title=exc.title, instance=request.url.path, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(400, describe_validation_error(exc), instance=request.url.path)

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
