"""Indexes for paging the OpenAI list endpoints in SQL.

``GET /v1/fine_tuning/jobs`` reads a tenant's jobs newest first by (``scheduled_at``, ``id``) and
``GET /v1/files`` a tenant's files by (``created_at``, ``id``), each as one keyset query with
``LIMIT``; these indexes let that query read only the page's rows instead of sorting all of the
tenant's. (Job events page on ``ix_job_events_job_id_seq``, which 0001 created.)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_scheduled_at_id", "jobs", ["tenant", "scheduled_at", "id"])
    op.create_index("ix_files_tenant_created_at_id", "files", ["tenant", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_files_tenant_created_at_id", table_name="files")
    op.drop_index("ix_jobs_tenant_scheduled_at_id", table_name="jobs")
