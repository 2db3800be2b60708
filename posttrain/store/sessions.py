"""Dashboard sign-in sessions, in the store so that they survive a restart and open on every API
server sharing one PostgreSQL.

A session is found by the digest of its id (the id itself lives only in the browser's cookie), and
only while it is unexpired and not revoked; signing out deletes its row. Expired rows go whenever a
new session is opened, so the table holds about as many rows as there are live sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select

from posttrain.store.tables import sessions


@dataclass(frozen=True)
class StoredSession:
    """A live session's row: whose it is and the API key it was opened with."""

    tenant: str
    key_digest: str
    expires_at: datetime


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we write is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class SessionStore:
    """All reads and writes of the ``sessions`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def open(self, *, token_digest: str, tenant: str, key_digest: str, expires_at: datetime) -> None:
        """A new session; the expired ones go in the same transaction."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
            conn.execute(insert(sessions).values(token_digest=token_digest, tenant=tenant, key_digest=key_digest,
                                                 created_at=now, expires_at=expires_at, revoked=False))

    def find(self, *, token_digest: str) -> StoredSession | None:
        """The live session with this digest: None when unknown, revoked or expired."""
        query = select(sessions.c.tenant, sessions.c.key_digest, sessions.c.expires_at).where(
            sessions.c.token_digest == token_digest, sessions.c.revoked.is_(False),
            sessions.c.expires_at > datetime.now(UTC))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return StoredSession(tenant=row.tenant, key_digest=row.key_digest, expires_at=_aware(row.expires_at))

    def close(self, *, token_digest: str) -> None:
        """Sign out: the row is deleted, so the id opens nothing on any server."""
        with self.engine.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.token_digest == token_digest))
