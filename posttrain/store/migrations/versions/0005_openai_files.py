"""The OpenAI Files API's uploads: table ``files``.

One row per uploaded file of a tenant; the bytes live in ``path`` (a file the upload published
whole before this row was committed). OpenAI fine-tuning jobs keep their OpenAI fields in the
job's ``request`` JSON, so ``jobs`` needs no new column.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_tenant", "files", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_files_tenant", table_name="files")
    op.drop_table("files")
