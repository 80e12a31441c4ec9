"""Initial schema: runs, items, observations, fetches, bad_messages.

Revision ID: 0001
Revises:
Create Date: 2024-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types of this revision (never import storage.models here).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("trigger", sa.String(), nullable=False),
        sa.Column("tick", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("queued_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("worker", sa.String(), nullable=True),
        sa.Column("stats", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_site_region_queued_at", "runs", ["site", "region", "queued_at"])

    op.create_table(
        "items",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("first_run_id", sa.String(), nullable=False),
        sa.Column("last_run_id", sa.String(), nullable=False),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_items"),
        sa.UniqueConstraint("site", "region", "key", name="uq_items_site_region_key"),
    )

    op.create_table(
        "observations",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("observed_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_observations_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_observations"),
        sa.UniqueConstraint("run_id", "key", name="uq_observations_run_id_key"),
    )
    op.create_index("ix_observations_site_region_key", "observations", ["site", "region", "key"])

    op.create_table(
        "fetches",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("final_url", sa.Text(), nullable=True),
        sa.Column("fetched_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_fetches_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_fetches"),
        sa.UniqueConstraint("run_id", "url", name="uq_fetches_run_id_url"),
    )

    op.create_table(
        "bad_messages",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bad_messages"),
    )


def downgrade() -> None:
    op.drop_table("bad_messages")
    op.drop_table("fetches")
    op.drop_index("ix_observations_site_region_key", table_name="observations")
    op.drop_table("observations")
    op.drop_table("items")
    op.drop_index("ix_runs_site_region_queued_at", table_name="runs")
    op.drop_table("runs")
