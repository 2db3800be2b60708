"""Table definitions. The Alembic revisions under ``migrations/versions`` create exactly these;
``tests/integration/test_migrations.py`` checks that the two never drift apart.

A job's ``job_uuid`` is the client's name for it and is unique per tenant only (two tenants may
both call a job "sft-1"); ``jobs.id`` is the service's own key, which checkpoints, events, the
launcher's lease and the job's folder use."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: SQLite only auto-increments INTEGER PRIMARY KEY columns.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("job_uuid", String(255), nullable=False),
    Column("tenant", String(128), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request", JSON, nullable=False),
    Column("plan", JSON, nullable=False),
    Column("scheduled_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("attempt", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=1),
    Column("lease_owner", String(255)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("resources", JSON, nullable=False, default=dict),
    # A hyperparameter search's trial names its search (migration 0008); ``search`` is the parent's
    # typed config, or a trial's number and values (docs/hyperparameter-search.md).
    Column("parent_job_id", String(255), index=True),
    Column("search", JSON(none_as_null=True)),  # SQL NULL, not JSON null, on every other job
    Index("ix_jobs_status_scheduled_at", "status", "scheduled_at"),
    # A tenant's jobs newest first, paged by (scheduled_at, id): GET /v1/fine_tuning/jobs (migration 0006).
    Index("ix_jobs_tenant_scheduled_at_id", "tenant", "scheduled_at", "id"),
    UniqueConstraint("tenant", "job_uuid", name="uq_jobs_tenant_job_uuid"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(255), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("identifier", String(512), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("train_loss", Float),
    Column("validation_loss", Float),
    Column("perplexity", Float),
    # Set when the user deleted the checkpoint's model (migration 0007): its files are gone, the
    # row stays so the job keeps its history; no read of a job's checkpoints returns it.
    Column("deleted_at", DateTime(timezone=True)),
    UniqueConstraint("job_id", "identifier", name="uq_checkpoints_job_id_identifier"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("seq", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(255), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("type", String(32), nullable=False),
    Column("data", JSON, nullable=False),
    Index("ix_job_events_job_id_seq", "job_id", "seq"),
)

datasets = Table(
    "datasets",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("identifier", String(255), primary_key=True),
    Column("purpose", String(64), nullable=False),
    Column("source", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("row_count", Integer, nullable=False, default=0),
    Column("rows_path", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: Uploads of the OpenAI Files API; ``id`` ("file-…") is the service's, random, so it is unique
#: across tenants, but every lookup is by (tenant, id): another tenant's file is not found.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A tenant's files in upload order, paged by (created_at, id): GET /v1/files (migration 0006).
    Index("ix_files_tenant_created_at_id", "tenant", "created_at", "id"),
)


#: Dashboard sign-in sessions (migration 0004): in the store, not one process's memory, so a session
#: survives a restart and opens on every API server of one PostgreSQL. Only the digest of the
#: session's id is kept (the id itself is in the browser's cookie); ``key_digest`` is the API key it
#: was opened with, so a key removed from the keys file opens none of its sessions.
sessions = Table(
    "sessions",
    metadata,
    Column("token_digest", String(80), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("key_digest", String(80), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("revoked", Boolean, nullable=False, default=False),
)
