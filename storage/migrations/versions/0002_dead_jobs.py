"""dead_jobs: dead-lettered jobs kept for inspection and requeue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dead_jobs",
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("job", JSON, nullable=False),
        sa.Column("dead_at", TS, nullable=False),
        sa.Column("requeued_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_dead_jobs")),
    )


def downgrade() -> None:
    op.drop_table("dead_jobs")
