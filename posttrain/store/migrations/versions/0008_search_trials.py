"""Hyperparameter searches: a search is a parent job, each of its trials an ordinary child job.

``parent_job_id`` names a trial's search (``jobs.id``; null for every other job), indexed so the
search driver reads its trials with one query. ``search`` holds, on the parent, the typed
``hyperparam_search_config`` it runs, and on a trial its number and the values it was given: the
store is the search's only record, from which a restarted driver rebuilds its study. No foreign
key: SQLite would have to rebuild the jobs table (which checkpoints and events refer to) to add
one, and jobs are never deleted.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN, never a batch: on SQLite a batch rebuilds the jobs table, and dropping
    # the old one would cascade-delete every job's checkpoints and events.
    op.add_column("jobs", sa.Column("parent_job_id", sa.String(255), nullable=True))
    op.add_column("jobs", sa.Column("search", sa.JSON, nullable=True))
    op.create_index("ix_jobs_parent_job_id", "jobs", ["parent_job_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent_job_id", table_name="jobs")
    for column in ("search", "parent_job_id"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")  # SQLite 3.35+ and PostgreSQL alike
