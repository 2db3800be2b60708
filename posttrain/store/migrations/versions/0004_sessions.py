"""Dashboard sign-in sessions move from the API process's memory into the store.

In memory, a restart signed every browser out and behind several API servers a browser had to stick
to the one it signed in on. The table keeps the digest of each session's id (never the id), its
tenant, the digest of the API key it was opened with, when it was opened and expires, and whether
it was revoked.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("token_digest", sa.String(80), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_digest", sa.String(80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("token_digest", name="pk_sessions"),
    )
    op.create_index("ix_sessions_expires_at", "sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_sessions_expires_at", table_name="sessions")
    op.drop_table("sessions")
