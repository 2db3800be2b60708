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


def _drop_child_keys(column: str) -> None:
    """The children's foreign keys to ``jobs`` (and the unique constraint and indexes on ``column``)."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(f"fk_checkpoints_{column}_jobs", type_="foreignkey")
        batch.drop_constraint(f"uq_checkpoints_{column}_identifier", type_="unique")
        batch.drop_index(f"ix_checkpoints_{column}")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint(f"fk_job_events_{column}_jobs", type_="foreignkey")
        batch.drop_index(f"ix_job_events_{column}_seq")


def _add_child_keys(column: str, parent: str) -> None:
    """The children's ``column`` referring to ``jobs.<parent>`` again, with its unique constraint and indexes."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.create_foreign_key(f"fk_checkpoints_{column}_jobs", "jobs", [column], [parent], ondelete="CASCADE")
        batch.create_unique_constraint(f"uq_checkpoints_{column}_identifier", [column, "identifier"])
        batch.create_index(f"ix_checkpoints_{column}", [column])
    with op.batch_alter_table("job_events") as batch:
        batch.create_foreign_key(f"fk_job_events_{column}_jobs", "jobs", [column], [parent], ondelete="CASCADE")
        batch.create_index(f"ix_job_events_{column}_seq", [column, "seq"])


def _rename_child_column(old: str, new: str) -> None:
    for child in ("checkpoints", "job_events"):
        with op.batch_alter_table(child) as batch:
            batch.alter_column(old, new_column_name=new, existing_type=sa.String(255), existing_nullable=False)


def upgrade() -> None:
    _drop_child_keys("job_uuid")
    _rename_child_column("job_uuid", "job_id")

    op.add_column("jobs", sa.Column("id", sa.String(255), nullable=True))
    op.execute("UPDATE jobs SET id = job_uuid")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("id", existing_type=sa.String(255), nullable=False)
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["id"])
        batch.create_unique_constraint("uq_jobs_tenant_job_uuid", ["tenant", "job_uuid"])

    _add_child_keys("job_id", "id")


def downgrade() -> None:
    """Back to one global job_uuid; fails (unique violation) while two tenants share a job_uuid."""
    _drop_child_keys("job_id")
    for child in ("checkpoints", "job_events"):
        op.execute(f"UPDATE {child} SET job_id = (SELECT jobs.job_uuid FROM jobs WHERE jobs.id = {child}.job_id)")  # noqa: S608 - our own table names
    _rename_child_column("job_id", "job_uuid")

    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_tenant_job_uuid", type_="unique")
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["job_uuid"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("id")

    _add_child_keys("job_uuid", "job_uuid")
