"""Egress attestation: runs.egress, workers.exits, fetches.exit_address.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("egress", JSON, nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("exits", JSON, nullable=True))
    with op.batch_alter_table("fetches") as batch:
        batch.add_column(sa.Column("exit_address", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fetches") as batch:
        batch.drop_column("exit_address")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("exits")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("egress")
