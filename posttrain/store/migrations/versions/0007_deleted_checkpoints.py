"""Checkpoints a user deleted through ``DELETE /v1/models/{id}``.

The checkpoint's files are removed, but its row stays, marked with ``deleted_at``: the job keeps
its history, and the catalogue can still tell which checkpoint was a job's final one (its
fine-tuned model) after that checkpoint is gone. Every read of a job's checkpoints skips the
marked rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("deleted_at")
