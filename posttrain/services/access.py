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

from posttrain.errors import RateLimited, Unauthorized

DEFAULT_TENANT = "default"

#: The dashboard's sign-in cookie. A browser sends no Authorization header when it opens a page, so
#: with API keys on, the sign-in page keeps the key in an HttpOnly, SameSite=Strict cookie (never
#: readable by scripts, never sent along by another site's page) and the API's gate accepts it.
#: Named here, with the keys, so the gate and the dashboard share it without importing each other.
KEY_COOKIE = "posttrain_key"


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


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class AccessControl:
    keys: dict[str, str] = field(default_factory=dict)
    requests_per_minute: int | None = None
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
