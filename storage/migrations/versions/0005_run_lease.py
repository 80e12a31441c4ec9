"""runs.heartbeat_at: the lease of a running run (ingest's reaper watches it).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    # The reaper's scan: running runs by heartbeat.
    op.create_index(op.f("ix_runs_status_heartbeat_at"), "runs", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_runs_status_heartbeat_at"), table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_at")
