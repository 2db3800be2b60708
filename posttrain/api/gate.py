"""The door every request passes: the Host allow-list (DNS rebinding), the refusal of what a
browser can send from another site (CSRF), body size (small on the paths open without a key),
API key or dashboard session -> tenant, the rate limits (per key; per client address for callers
without a valid key and for sign-in attempts), a caller's state-changing calls two at a time
(``WRITES_PER_CALLER``), and the request metrics. A plain ASGI middleware
(not Starlette's BaseHTTPMiddleware, which costs about a millisecond a request, a third of what a
status poll costs in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Collection
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from posttrain.api.problems import problem
from posttrain.errors import RateLimited, ServiceError, StoreUnavailable, Unauthorized
from posttrain.services.access import (
    CSRF_COOKIE,
    CSRF_HEADER,
    DEFAULT_TENANT,
    SESSION_COOKIE,
    AccessControl,
    Session,
    same_token,
)

#: Answered without an API key: liveness for load balancers, metrics, the API's own description
#: (/docs, /redoc and their static files), and the dashboard's sign-in page and its static files
#: (which hold no data).
OPEN_PATHS = frozenset({"/v1/health", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc", "/ui/login", "/ui/logout"})
OPEN_PREFIXES = ("/ui/static/", "/docs/static/")
#: The dashboard's form posts: they carry their CSRF token in the form body and check it themselves.
FORM_PATHS = frozenset({"/ui/login", "/ui/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Content types a page on another site can send without a CORS preflight (an HTML form, or fetch in
#: no-cors mode). The JSON API takes none of them on a state-changing call.
SIMPLE_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})

#: State-changing calls of one key (or one keyless address) run this many at a time; the rest wait
#: their turn, holding no thread. On two cores a tenant's burst of registrations and submits ran a
#: dozen handler threads at once, and every other tenant's status poll queued for the GIL behind
#: them (bench/abuse.py: alice's p99 under the storm 5.0-5.3x quiet, 3.4-3.9x with this).
WRITES_PER_CALLER = 2
#: Posts that change nothing and may stream for minutes: a tenant's chats take no write slot.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

Observer = Callable[[str, str, int, float], None]


class Gate:
    def __init__(self, app: ASGIApp, *, access: AccessControl, max_body_bytes: int, observe: Observer,
                 allowed_hosts: Collection[str] = ("localhost",), open_max_body_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.access = access
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes
        #: Anyone may send to an open path, so its body limit is small: a 60 MB sign-in form was read
        #: and parsed whole on the event loop (every other request waited; four at once took 5 GB).
        self.open_max_body_bytes = min(open_max_body_bytes, max_body_bytes)
        self.observe = observe
        self._writes = CallerSlots(WRITES_PER_CALLER)

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
            # A session cookie is looked up in the store: off the event loop, so a slow store
            # never stalls the requests that need none (/healthz, API-key clients).
            if self.access.enabled and any(k == b"cookie" and SESSION_COOKIE.encode() in v for k, v in scope["headers"]):
                refusal = await run_in_threadpool(self._admit, scope)
            else:
                refusal = self._admit(scope)
            if refusal is None and not _has_length(scope):
                receive, refusal = await self._buffer_unannounced_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_and_record)
            elif scope["method"] in SAFE_METHODS or scope["path"] in GENERATION_PATHS:
                await self.app(scope, receive, send_and_record)
            else:
                async with self._writes.slot(scope["state"].get("rate_identity") or _client_address(scope)):
                    await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.observe(scope["method"], route, status_holder["status"], time.perf_counter() - started)

    def _admit(self, scope: Scope):  # noqa: ANN202 - a response to send instead, or None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        host = headers.get("host", "")
        if not _host_allowed(host, self.allowed_hosts):
            return problem(421, f"this server does not answer for the host '{host}'; add it to "
                           "POSTTRAIN_ALLOWED_HOSTS if it is this server's name", title="Misdirected Request",
                           instance=path)
        unsafe = scope["method"] not in SAFE_METHODS
        if unsafe:
            refusal = _cross_site_refusal(headers, host, path)
            if refusal is not None:
                return refusal
        length = headers.get("content-length")
        limit = self._body_limit(path)
        if length is not None and length.isdigit() and int(length) > limit:
            return _too_large(limit, path)
        address = _client_address(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        cookies = _cookies(headers.get("cookie"))
        try:  # sessions are in the store, which may be busy or unreachable: a 503, never a 500
            session = self.access.session(cookies.get(SESSION_COOKIE)) if self.access.enabled else None
        except StoreUnavailable as exc:
            return problem(exc.status_code, exc.detail, title=exc.title, instance=path,
                           headers={"Retry-After": str(exc.retry_after)})
        state["session"] = session
        state["session_id"] = cookies.get(SESSION_COOKIE) if session is not None else None
        state["csrf_cookie"] = cookies.get(CSRF_COOKIE)
        if _is_open(path):
            state["tenant"] = DEFAULT_TENANT
            if path == "/ui/login" and unsafe:
                try:
                    self.access.charge_sign_in(address)
                except RateLimited as exc:
                    return _refusal(exc, path)
            return None
        authorization = headers.get("authorization")
        if unsafe and path not in FORM_PATHS and not _csrf_passed(headers, authorization, session, state["csrf_cookie"]):
            return problem(403, f"a browser's state-changing call needs the page's CSRF token in {CSRF_HEADER}",
                           instance=path)
        identity: str | None
        try:
            if authorization is None and session is not None:
                state["tenant"], identity = session.tenant, session.identity
            else:
                state["tenant"], identity = self.access.authenticate(authorization)
        except Unauthorized as exc:
            try:
                self.access.charge_failed_auth(address)  # key guessing, and floods of refused calls
            except RateLimited as limited:
                return _refusal(limited, path)
            if scope["method"] == "GET" and _is_dashboard_page(path):
                return RedirectResponse("/ui/login", status_code=303)
            return _refusal(exc, path)
        try:
            self.access.check_rate(identity, address)
            if length is not None and length.isdigit():
                self.access.charge_body(identity, address, int(length))
        except ServiceError as exc:
            return _refusal(exc, path)
        state["rate_identity"] = identity
        return None

    def _body_limit(self, path: str) -> int:
        return self.open_max_body_bytes if _is_open(path) else self.max_body_bytes

    async def _buffer_unannounced_body(self, scope: Scope, receive: Receive):  # noqa: ANN202
        """A chunked body announces no length: read it here, up to the limit, then replay it.

        (Raising from inside the app's own body reading would be turned into a 400 by FastAPI.)
        """
        messages: list[Message] = []
        size = 0
        limit = self._body_limit(scope["path"])
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return receive, _too_large(limit, scope["path"])
            if not message.get("more_body", False):
                break
        if not _is_open(scope["path"]):
            try:
                self.access.charge_body(scope["state"].get("rate_identity"), _client_address(scope), size)
            except ServiceError as exc:
                return receive, _refusal(exc, scope["path"])

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay, None


class CallerSlots:
    """At most ``size`` calls of one caller inside at a time; a caller's entry lives while it has one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._callers: dict[str, tuple[asyncio.Semaphore, int]] = {}  # caller -> (its slots, calls in or waiting)

    @contextlib.asynccontextmanager
    async def slot(self, caller: str) -> AsyncIterator[None]:
        slots, calls = self._callers.get(caller) or (asyncio.Semaphore(self.size), 0)
        self._callers[caller] = (slots, calls + 1)
        try:
            async with slots:
                yield
        finally:
            slots, calls = self._callers[caller]
            if calls == 1:
                del self._callers[caller]
            else:
                self._callers[caller] = (slots, calls - 1)

    def __len__(self) -> int:
        return len(self._callers)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _too_large(limit: int, path: str) -> JSONResponse:
    return problem(413, f"the request body is larger than {limit} bytes", instance=path)


def _refusal(exc: ServiceError, path: str) -> JSONResponse:
    """A refusal as its Problem, with the header it calls for (Retry-After on 429, the scheme on 401)."""
    extra = None
    if isinstance(exc, RateLimited):
        extra = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, Unauthorized):
        extra = {"WWW-Authenticate": "Bearer"}
    return problem(exc.status_code, exc.detail, title=exc.title, instance=path, headers=extra)


def _has_length(scope: Scope) -> bool:
    return any(name == b"content-length" for name, _ in scope["headers"])


def _cookies(cookie_header: str | None) -> dict[str, str]:
    """The request's cookies by name (a browser sends no Authorization header when it opens a page,
    so the dashboard's session travels in a cookie; the header wins when both come)."""
    if not cookie_header:
        return {}
    try:
        return {name: morsel.value for name, morsel in SimpleCookie(cookie_header).items() if morsel.value}
    except CookieError:
        return {}


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """A Host header naming this server: an IP address (a rebinding page always names its own
    domain), or an allowed name. The port does not matter; the name does."""
    if "*" in allowed:
        return True
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    name = name.rstrip(".").lower()
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in allowed


def _cross_site_refusal(headers: dict[str, str], host: str, path: str) -> JSONResponse | None:
    """A state-changing request a browser sent from another site, or a form-shaped body on the JSON
    API: refused before anything runs. Official clients send no Origin nor Sec-Fetch-Site, and
    send JSON (or, for a bare 0.5/0.6 cancel, no body and no content type): they pass."""
    fetch_site = headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        return problem(403, f"a {fetch_site} request may not change anything here", instance=path)
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return problem(403, f"a request from the page at '{origin}' may not change anything here", instance=path)
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type in SIMPLE_CONTENT_TYPES and not path.startswith("/ui/") and not _is_upload(path, media_type):
        return problem(415, f"this API takes application/json, not {media_type}", instance=path)
    return None


def _is_upload(path: str, media_type: str) -> bool:
    """OpenAI's file upload (``POST /v1/files``) is multipart by its spec; the Origin and
    Sec-Fetch-Site checks above still refuse one sent from another site."""
    return path == "/v1/files" and media_type == "multipart/form-data"


def _csrf_passed(headers: dict[str, str], authorization: str | None, session: Session | None,
                 csrf_cookie: str | None) -> bool:
    """A state-changing call that a browser could make carries the page's CSRF token: the session's
    (synchronizer) when a session cookie signs it in, else the double-submit cookie's. A call with
    an Authorization header and no browser signal is a client's, which no other site can forge."""
    token = headers.get(CSRF_HEADER)
    if authorization is None and session is not None:
        return same_token(token, session.csrf_token)
    if "origin" in headers or "sec-fetch-site" in headers:
        return same_token(token, csrf_cookie)
    return True


def _is_dashboard_page(path: str) -> bool:
    """A page a person opens in a browser: without a key they are sent to sign in, not shown a 401.
    (The static files never get here: they are open.)"""
    return path == "/" or path.startswith("/ui/")
