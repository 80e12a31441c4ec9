"""Issue 14, comparisons you can trust: digests and block signatures on fetches,
extra samples per page, kept bodies (WARC), degraded-run reasons and pending alerts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def _keyed(table: str, key: str) -> list[sa.Constraint]:
    """Primary key, run foreign key, unique (run_id, sample, key): named as the models do."""
    return [
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f(f"fk_{table}_run_id_runs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("run_id", "sample", key, name=op.f(f"uq_{table}_run_id_sample_{key}")),
    ]


def upgrade() -> None:
    with op.batch_alter_table("fetches") as batch:
        batch.add_column(sa.Column("sha256", sa.String(), nullable=True))
        batch.add_column(sa.Column("block", sa.String(), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("reasons", JSON, nullable=True))

    op.create_table(
        "item_samples",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("observed_at", WHEN, nullable=False),
        *_keyed("item_samples", "key"),
        sa.ForeignKeyConstraint(
            ["content_hash"],
            ["contents.hash"],
            name=op.f("fk_item_samples_content_hash_contents"),
        ),
    )
    op.create_table(
        "fetch_samples",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("final_url", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(), nullable=True),
        sa.Column("block", sa.String(), nullable=True),
        sa.Column("fetched_at", WHEN, nullable=False),
        *_keyed("fetch_samples", "url"),
    )
    op.create_table(
        "bodies",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("final_url", sa.Text(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("headers", JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("fetched_at", WHEN, nullable=False),
        *_keyed("bodies", "url"),
    )
    op.create_table(
        "alerts",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("sink", JSON, nullable=False),
        sa.Column("message", JSON, nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("next_attempt_at", WHEN, nullable=False),
        sa.Column("sent_at", WHEN, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    op.create_index(
        op.f("ix_alerts_site_region_reason_created_at"),
        "alerts",
        ["site", "region", "reason", "created_at"],
    )
    op.create_index(
        op.f("ix_alerts_status_next_attempt_at"), "alerts", ["status", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_alerts_status_next_attempt_at"), table_name="alerts")
    op.drop_index(op.f("ix_alerts_site_region_reason_created_at"), table_name="alerts")
    for table in ("alerts", "bodies", "fetch_samples", "item_samples"):
        op.drop_table(table)
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reasons")
    with op.batch_alter_table("fetches") as batch:
        batch.drop_column("block")
        batch.drop_column("sha256")
