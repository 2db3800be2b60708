"""Engine construction and schema migration.

SQLite gets WAL (readers never wait for the writer, so status polls stay fast while a launcher
writes metrics) and a busy timeout (several threads and processes share one file). The busy
timeout is short on purpose: a request that cannot get the store within it answers 503 with
``Retry-After`` at once instead of holding a thread for half a minute; PostgreSQL sessions get
the same bound as ``lock_timeout`` and ``connect_timeout``. Every operational failure of the
database (locked, refused, timed out, disconnected) leaves the store as one exception,
``errors.StoreUnavailable``, raised from a single ``handle_error`` hook on the engine, so no
store method needs its own ``try``; a pool with every connection checked out for longer than the
busy timeout (a burst of concurrent requests) says the same from ``BoundedPool``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from posttrain.errors import StoreUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).parent / "migrations"

#: How long a statement waits for a lock (or a connection) before the store gives up.
DEFAULT_BUSY_TIMEOUT_SECONDS = 3.0


class BoundedPool(QueuePool):
    """SQLAlchemy's queue pool, whose checkout timeout is the store being busy, not a bug: the
    pool error is raised outside any statement, so the ``handle_error`` hook never sees it."""

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except PoolTimeout as error:
            raise StoreUnavailable(f"the store is busy: all {self.size() + self._max_overflow} connections "
                                   "are in use; try again shortly") from error


def make_engine(url: str, *, busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS) -> Engine:
    wait_ms = max(1, int(busy_timeout_seconds * 1000))
    if url.startswith("sqlite"):
        pool: dict[str, object] = {} if ":memory:" in url else {  # in memory: one connection, no queue
            "poolclass": BoundedPool, "pool_size": 10, "max_overflow": 20, "pool_timeout": busy_timeout_seconds}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_seconds},
                               **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={wait_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    else:
        connect_args: dict[str, object] = {}
        if url.startswith("postgresql"):
            connect_args = {"connect_timeout": max(1, math.ceil(busy_timeout_seconds)),
                            "options": f"-c lock_timeout={wait_ms}"}
        engine = create_engine(url, poolclass=BoundedPool, pool_pre_ping=True, pool_size=10, max_overflow=20,
                               pool_timeout=busy_timeout_seconds, connect_args=connect_args)
    event.listen(engine, "handle_error", _store_unavailable)
    return engine


def _store_unavailable(context: ExceptionContext) -> None:
    """The one place a database's operational failure becomes ``StoreUnavailable`` (a 503 with
    ``Retry-After`` at the API, a retry in the launcher). Other errors (integrity, programming)
    pass through unchanged: they are answers or bugs, not a store in trouble."""
    error = context.sqlalchemy_exception
    if isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and context.is_disconnect):
        reason = str(context.original_exception).strip().splitlines()[0][:200] if context.original_exception else ""
        raise StoreUnavailable(f"the store is busy or unreachable ({reason}); try again shortly") from error


def store_usable(engine: Engine, *, timeout_seconds: float) -> None:
    """Read and write the store within ``timeout_seconds`` (for /readyz), changing nothing: the
    schema version row is updated to itself and the transaction rolled back. Raises
    ``StoreUnavailable`` when the store cannot be read or written in time."""
    wait_ms = max(1, int(timeout_seconds * 1000))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        previous = connection.exec_driver_sql("PRAGMA busy_timeout").scalar() if sqlite else None
        connection.rollback()
        try:
            if sqlite:
                connection.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
            elif connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
                connection.exec_driver_sql(f"SET LOCAL statement_timeout = {wait_ms}")
            connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
        finally:
            connection.rollback()
            if sqlite:
                connection.exec_driver_sql(f"PRAGMA busy_timeout={int(previous or wait_ms)}")
                connection.rollback()


def alembic_config(url: str) -> Config:  # alembic is imported lazily
    """Alembic's config for our migrations on ``url`` (for ``migrate`` and for tests that step
    through single revisions)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe at every start), or to
    ``revision``."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def at_head(engine: Engine) -> bool:
    """True when the database schema is at the newest revision (for /readyz)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(script.get_heads())
