"""Who is calling, and whether they may call now: API keys (stored hashed) mapped to tenants,
and a per-key request rate limit.

Keys come from configuration as ``sha256:<hex>`` digests, never in clear: ``posttrain keys create``
prints a new key once and writes only its digest. With no keys configured the server is open
(bound to 127.0.0.1 by default) and every caller is the tenant ``default``.
"""

from __future__ import annotations

import hashlib
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


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class AccessControl:
    keys: dict[str, str] = field(default_factory=dict)
    requests_per_minute: int | None = None
    session_seconds: float = SESSION_SECONDS
    #: Dashboard sessions, in the store: they survive a restart and open on every API server
    #: sharing the database.
    sessions: SessionStore | None = None
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> tuple[str, str]:
        """(tenant, rate-limit identity) for an ``Authorization: Bearer <key>`` header."""
        if not self.keys:
            return DEFAULT_TENANT, DEFAULT_TENANT
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

    def check_rate(self, identity: str) -> None:
        """Token bucket per key: ``requests_per_minute`` sustained, bursts up to the same number."""
        if not self.requests_per_minute:
            return
        capacity = float(self.requests_per_minute)
        per_second = capacity / 60.0
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(identity) or _Bucket(tokens=capacity, updated=now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            if bucket.tokens < 1.0:
                self._buckets[identity] = bucket
                wait = math.ceil((1.0 - bucket.tokens) / per_second)
                raise RateLimited(f"more than {self.requests_per_minute} requests a minute with this key; "
                                  f"try again in {wait} s", retry_after=wait)
            bucket.tokens -= 1.0
            self._buckets[identity] = bucket
