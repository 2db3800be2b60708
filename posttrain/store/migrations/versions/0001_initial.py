"""Initial schema: jobs, checkpoints, job_events, datasets.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_uuid", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("job_uuid", name="pk_jobs"),
    )
    op.create_index("ix_jobs_tenant", "jobs", ["tenant"])
    op.create_index("ix_jobs_status_scheduled_at", "jobs", ["status", "scheduled_at"])

    op.create_table(
        "checkpoints",
        sa.Column("id", AutoId, autoincrement=True, nullable=False),
        sa.Column("job_uuid", sa.String(255), nullable=False),
        sa.Column("identifier", sa.String(512), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("train_loss", sa.Float()),
        sa.Column("validation_loss", sa.Float()),
        sa.Column("perplexity", sa.Float()),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
        sa.ForeignKeyConstraint(
            ["job_uuid"], ["jobs.job_uuid"], name="fk_checkpoints_job_uuid_jobs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("job_uuid", "identifier", name="uq_checkpoints_job_uuid_identifier"),
    )
    op.create_index("ix_checkpoints_job_uuid", "checkpoints", ["job_uuid"])

    op.create_table(
        "job_events",
        sa.Column("seq", AutoId, autoincrement=True, nullable=False),
        sa.Column("job_uuid", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_job_events"),
        sa.ForeignKeyConstraint(
            ["job_uuid"], ["jobs.job_uuid"], name="fk_job_events_job_uuid_jobs", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_job_events_job_uuid_seq", "job_events", ["job_uuid", "seq"])

    op.create_table(
        "datasets",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("identifier", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("rows_path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "identifier", name="pk_datasets"),
    )


def downgrade() -> None:
    op.drop_table("datasets")
    op.drop_index("ix_job_events_job_uuid_seq", table_name="job_events")
    op.drop_table("job_events")
    op.drop_index("ix_checkpoints_job_uuid", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_index("ix_jobs_status_scheduled_at", table_name="jobs")
    op.drop_index("ix_jobs_tenant", table_name="jobs")
    op.drop_table("jobs")
