"""code_bundles (geoscrape deploy) and runs.code_version (the code a run used).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)  # a frozen copy (never import storage.models here)


def upgrade() -> None:
    op.create_table(
        "code_bundles",
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("deployed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("sha256", "name", name=op.f("pk_code_bundles")),
    )
    # The newest bundle of a name: what dispatch pins.
    op.create_index(
        op.f("ix_code_bundles_name_deployed_at"), "code_bundles", ["name", "deployed_at"]
    )
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("code_version", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("code_version")
    op.drop_index(op.f("ix_code_bundles_name_deployed_at"), table_name="code_bundles")
    op.drop_table("code_bundles")
