"""job_uuid is unique per tenant: jobs get the service's own key ``id``.

Two tenants may now both call a job "sft-1"; before, the second got a 409 that also told it the
other tenant's job existed. Checkpoints and events refer to ``jobs.id``. Existing jobs keep their
job_uuid as their id, so the rows that refer to them need no rewriting.

The child tables lose their foreign keys first and get them back last: on SQLite a batch
operation recreates a table, and dropping a parent that children still point at (with
``ON DELETE CASCADE``) would delete their rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("fk_checkpoints_job_uuid_jobs", type_="foreignkey")
        batch.drop_constraint("uq_checkpoints_job_uuid_identifier", type_="unique")
        batch.drop_index("ix_checkpoints_job_uuid")
        batch.alter_column("job_uuid", new_column_name="job_id", existing_type=sa.String(255), existing_nullable=False)
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint("fk_job_events_job_uuid_jobs", type_="foreignkey")
        batch.drop_index("ix_job_events_job_uuid_seq")
        batch.alter_column("job_uuid", new_column_name="job_id", existing_type=sa.String(255), existing_nullable=False)

    op.add_column("jobs", sa.Column("id", sa.String(255), nullable=True))
    op.execute("UPDATE jobs SET id = job_uuid")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("id", existing_type=sa.String(255), nullable=False)
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["id"])
        batch.create_unique_constraint("uq_jobs_tenant_job_uuid", ["tenant", "job_uuid"])

    with op.batch_alter_table("checkpoints") as batch:
        batch.create_foreign_key("fk_checkpoints_job_id_jobs", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
        batch.create_unique_constraint("uq_checkpoints_job_id_identifier", ["job_id", "identifier"])
        batch.create_index("ix_checkpoints_job_id", ["job_id"])
    with op.batch_alter_table("job_events") as batch:
        batch.create_foreign_key("fk_job_events_job_id_jobs", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_job_events_job_id_seq", ["job_id", "seq"])


def downgrade() -> None:
    """Back to one global job_uuid; fails (unique violation) while two tenants share a job_uuid."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("fk_checkpoints_job_id_jobs", type_="foreignkey")
        batch.drop_constraint("uq_checkpoints_job_id_identifier", type_="unique")
        batch.drop_index("ix_checkpoints_job_id")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint("fk_job_events_job_id_jobs", type_="foreignkey")
        batch.drop_index("ix_job_events_job_id_seq")
    for child in ("checkpoints", "job_events"):
        op.execute(f"UPDATE {child} SET job_id = (SELECT jobs.job_uuid FROM jobs WHERE jobs.id = {child}.job_id)")
        with op.batch_alter_table(child) as batch:
            batch.alter_column("job_id", new_column_name="job_uuid", existing_type=sa.String(255), existing_nullable=False)

    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_tenant_job_uuid", type_="unique")
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["job_uuid"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("id")

    with op.batch_alter_table("checkpoints") as batch:
        batch.create_foreign_key("fk_checkpoints_job_uuid_jobs", "jobs", ["job_uuid"], ["job_uuid"], ondelete="CASCADE")
        batch.create_unique_constraint("uq_checkpoints_job_uuid_identifier", ["job_uuid", "identifier"])
        batch.create_index("ix_checkpoints_job_uuid", ["job_uuid"])
    with op.batch_alter_table("job_events") as batch:
        batch.create_foreign_key("fk_job_events_job_uuid_jobs", "jobs", ["job_uuid"], ["job_uuid"], ondelete="CASCADE")
        batch.create_index("ix_job_events_job_uuid_seq", ["job_uuid", "seq"])
