"""The door every request passes: body size, API key -> tenant, the per-key rate limit, and the
request metrics. A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which costs about a
millisecond a request, a third of what a status poll costs in all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from posttrain.api.problems import problem
from posttrain.errors import RateLimited, ServiceError, Unauthorized
from posttrain.services.access import DEFAULT_TENANT, KEY_COOKIE, AccessControl

#: Answered without an API key: liveness for load balancers, metrics, the API's own description
#: (/docs, /redoc and their static files), and the dashboard's sign-in page and its static files
#: (which hold no data).
OPEN_PATHS = frozenset({"/v1/health", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc", "/ui/login", "/ui/logout"})
OPEN_PREFIXES = ("/ui/static/", "/docs/static/")

Observer = Callable[[str, str, int, float], None]


class Gate:
    def __init__(self, app: ASGIApp, *, access: AccessControl, max_body_bytes: int, observe: Observer) -> None:
        self.app = app
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            refusal = self._admit(scope)
            if refusal is None and not _has_length(scope):
                receive, refusal = await self._buffer_unannounced_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.observe(scope["method"], route, status_holder["status"], time.perf_counter() - started)

    def _admit(self, scope: Scope):  # noqa: ANN202 - a response to send instead, or None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return problem(413, f"the request body is larger than {self.max_body_bytes} bytes", instance=path)
        state: dict[str, Any] = scope.setdefault("state", {})
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            state["tenant"] = DEFAULT_TENANT
            return None
        authorization = headers.get("authorization") or _cookie_authorization(headers.get("cookie"))
        try:
            state["tenant"], identity = self.access.authenticate(authorization)
            self.access.check_rate(identity)
        except ServiceError as exc:
            extra = None
            if isinstance(exc, RateLimited):
                extra = {"Retry-After": str(exc.retry_after)}
            elif isinstance(exc, Unauthorized):
                if scope["method"] == "GET" and _is_dashboard_page(path):
                    return RedirectResponse("/ui/login", status_code=303)
                extra = {"WWW-Authenticate": "Bearer"}
            return problem(exc.status_code, exc.detail, title=exc.title, instance=path, headers=extra)
        return None

    async def _buffer_unannounced_body(self, scope: Scope, receive: Receive):  # noqa: ANN202
        """A chunked body announces no length: read it here, up to the limit, then replay it.

        (Raising from inside the app's own body reading would be turned into a 400 by FastAPI.)
        """
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return receive, problem(413, f"the request body is larger than {self.max_body_bytes} bytes",
                                        instance=scope["path"])
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay, None


def _has_length(scope: Scope) -> bool:
    return any(name == b"content-length" for name, _ in scope["headers"])


def _cookie_authorization(cookie_header: str | None) -> str | None:
    """The dashboard's sign-in cookie as an Authorization value, if the request carries one (a
    browser sends no Authorization header when it opens a page; the header wins when both come)."""
    if not cookie_header:
        return None
    try:
        morsel = SimpleCookie(cookie_header).get(KEY_COOKIE)
    except CookieError:
        return None
    return f"Bearer {morsel.value}" if morsel is not None and morsel.value else None


def _is_dashboard_page(path: str) -> bool:
    """A page a person opens in a browser: without a key they are sent to sign in, not shown a 401.
    (The static files never get here: they are open.)"""
    return path == "/" or path.startswith("/ui/")
