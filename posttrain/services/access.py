"""Who is calling, and whether they may call now: API keys (stored hashed) mapped to tenants,
and request rate limits: per key, and per client address where there is no key (a keyless server,
requests with no key or a wrong one, dashboard sign-in attempts), so no caller spends another's budget.

Keys come from configuration as ``sha256:<hex>`` digests, never in clear: ``posttrain keys create``
prints a new key once and writes only its digest. With no keys configured the server is open
(bound to 127.0.0.1 by default) and every caller is the tenant ``default``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from posttrain.errors import RateLimited, Unauthorized
from posttrain.store.sessions import SessionStore

DEFAULT_TENANT = "default"

#: The dashboard's sign-in cookie. A browser sends no Authorization header when it opens a page, so
#: with API keys on, signing in opens a server-side session and the cookie holds only its random id
#: (HttpOnly, SameSite=Strict): never the key, and signing out revokes it. Named here, with the keys,
#: so the gate and the dashboard share it without importing each other.
SESSION_COOKIE = "posttrain_session"
#: The double-submit CSRF cookie of a browser with no session (the sign-in form, an open server's
#: dashboard); a signed-in browser's token is its session's own (synchronizer token).
CSRF_COOKIE = "posttrain_csrf"
#: Where the dashboard's scripts send the token on a state-changing call (a form sends ``csrf_token``).
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
#: How long a dashboard session lasts after sign-in.
SESSION_SECONDS = 8 * 3600.0


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "pt-" + secrets.token_urlsafe(32)


def parse_key_lines(text: str) -> dict[str, str]:
    """``tenant:sha256:<hex>`` lines (``#`` comments allowed) -> {digest: tenant}."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tenant, _, key_digest = line.partition(":")
        if not tenant or not key_digest.startswith("sha256:") or len(key_digest) != 71:
            raise ValueError(f"api keys file, line {number}: expected 'tenant:sha256:<64 hex digits>'")
        keys[key_digest] = tenant
    return keys


def new_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_token_of(session_id: str) -> str:
    """A session's CSRF token (synchronizer), derived from its id: nothing to store, the same on
    every server, and not computable from the digest the store keeps."""
    return hashlib.sha256(b"posttrain-csrf:" + session_id.encode()).hexdigest()


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an empty or missing token never matches."""
    return bool(given) and bool(expected) and secrets.compare_digest(str(given), str(expected))


@dataclass(frozen=True)
class Session:
    """A signed-in browser: its tenant, the key's digest (its rate-limit identity), its CSRF token."""

    tenant: str
    identity: str
    csrf_token: str
    expires_at: float


def address_key(host: str | None) -> str:
    """The client address that limits are counted by: the address itself, or for IPv6 its /64 (one
    host is usually given a whole /64, so counting single addresses would let it take 2^64 buckets)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    updated: float


#: Past this many buckets, full (idle) ones are dropped, so many addresses cannot grow memory for ever.
PRUNE_BUCKETS_PAST = 10_000


@dataclass
class AccessControl:
    keys: dict[str, str] = field(default_factory=dict)
    requests_per_minute: int | None = None
    #: Requests with no key or a wrong one, per client address (stricter than a key's own limit).
    failed_auth_per_minute: int | None = 60
    #: Dashboard sign-in attempts per client address (stricter still: each one guesses a key).
    sign_in_attempts_per_minute: int | None = 10
    #: Request body bytes a minute per key (per address without keys): what one client's uploads may
    #: cost the server, whose every body is read and parsed by the process that answers everyone.
    body_bytes_per_minute: int | None = None
    #: The most one body may be (the gate's 413 limit): the body budget's burst always admits one.
    max_body_bytes: int = 0
    session_seconds: float = SESSION_SECONDS
    #: Dashboard sessions, in the store: they survive a restart and open on every API server
    #: sharing the database.
    sessions: SessionStore | None = None
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    _prune_at: int = PRUNE_BUCKETS_PAST
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> tuple[str, str | None]:
        """(tenant, rate-limit identity) for an ``Authorization: Bearer <key>`` header; the identity
        is None on a server without keys (its callers are told apart by address)."""
        if not self.keys:
            return DEFAULT_TENANT, None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        tenant = self.tenant_for_key(key)
        if tenant is None:
            raise Unauthorized("the API key is not valid")
        return tenant, digest(key.strip())

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant a key belongs to, or None for an unknown key (the dashboard's sign-in)."""
        return self.keys.get(digest(key.strip())) if key.strip() else None

    def open_session(self, key: str) -> tuple[str, Session] | None:
        """Sign a browser in with a key: (the new session's id for its cookie, the session), or None.
        The store keeps only the id's digest."""
        tenant = self.tenant_for_key(key)
        if tenant is None:
            return None
        session_id = new_token()
        expires_at = datetime.now(UTC) + timedelta(seconds=self.session_seconds)
        self._session_store().open(token_digest=digest(session_id), tenant=tenant, key_digest=digest(key.strip()),
                                   expires_at=expires_at)
        return session_id, Session(tenant=tenant, identity=digest(key.strip()), csrf_token=csrf_token_of(session_id),
                                   expires_at=expires_at.timestamp())

    def session(self, session_id: str | None) -> Session | None:
        """The live session a cookie names; None when unknown, revoked, expired, or opened with a
        key that is no longer in the keys file."""
        if not session_id or not self.keys:
            return None
        stored = self._session_store().find(token_digest=digest(session_id))
        if stored is None or self.keys.get(stored.key_digest) != stored.tenant:
            return None
        return Session(tenant=stored.tenant, identity=stored.key_digest, csrf_token=csrf_token_of(session_id),
                       expires_at=stored.expires_at.timestamp())

    def close_session(self, session_id: str | None) -> None:
        """Sign out: the cookie's id no longer opens anything, wherever a copy of it is, on any server."""
        if session_id:
            self._session_store().close(token_digest=digest(session_id))

    def _session_store(self) -> SessionStore:
        if self.sessions is None:
            raise RuntimeError("dashboard sessions need a session store (build_access gives one)")
        return self.sessions

    def check_rate(self, identity: str | None, address: str) -> None:
        """``requests_per_minute`` per key, or per client address for a caller without one."""
        if self.requests_per_minute:
            who = "with this key" if identity else "from this address"
            self._take("key" if identity else "address", identity or address_key(address),
                       self.requests_per_minute, f"requests a minute {who}")

    def charge_failed_auth(self, address: str) -> None:
        """Count a request with no key or a wrong one against its address: RateLimited past the limit."""
        if self.failed_auth_per_minute:
            self._take("failed", address_key(address), self.failed_auth_per_minute,
                       "requests a minute without a valid API key from this address")

    def charge_sign_in(self, address: str) -> None:
        """Count a dashboard sign-in attempt against its address: RateLimited past the limit."""
        if self.sign_in_attempts_per_minute:
            self._take("sign-in", address_key(address), self.sign_in_attempts_per_minute,
                       "sign-in attempts a minute from this address")

    def charge_body(self, identity: str | None, address: str, size: int) -> None:
        """Count ``size`` body bytes against the caller's budget, before any is read: RateLimited
        past ``body_bytes_per_minute``. Bursts reach a quarter minute's budget, or one largest body."""
        if self.body_bytes_per_minute and size > 0:
            who = "with this key" if identity else "from this address"
            self._take("bytes" if identity else "address-bytes", identity or address_key(address),
                       self.body_bytes_per_minute, f"request body bytes a minute {who}", cost=float(size),
                       capacity=float(max(self.body_bytes_per_minute // 4, self.max_body_bytes)))

    def _take(self, kind: str, who: str, per_minute: int, what: str, *, cost: float = 1.0,
              capacity: float | None = None) -> None:
        """Token bucket: ``per_minute`` sustained; bursts up to ``capacity`` (default the same number)."""
        per_second = per_minute / 60.0
        capacity = float(per_minute) if capacity is None else capacity
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > self._prune_at:
                self._prune(now)
            bucket = self._buckets.get((kind, who)) or _Bucket(tokens=capacity, updated=now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            self._buckets[(kind, who)] = bucket
            if bucket.tokens < cost:
                wait = math.ceil((cost - bucket.tokens) / per_second)
                raise RateLimited(f"more than {per_minute} {what}; try again in {wait} s",
                                  retry_after=wait)
            bucket.tokens -= cost

    def _prune(self, now: float) -> None:
        """Drop buckets idle long enough to be full again (the slowest refills in a minute)."""
        for key in [k for k, b in self._buckets.items() if now - b.updated >= 60.0]:
            del self._buckets[key]
        self._prune_at = max(PRUNE_BUCKETS_PAST, 2 * len(self._buckets))
