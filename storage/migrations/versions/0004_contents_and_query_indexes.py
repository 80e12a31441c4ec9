"""Content-addressed observation data (contents table) and the query indexes.

observations.data moves to ``contents`` (one row per distinct data, keyed by
its hash); observations keep the hash. Existing rows are hashed in batches.
Indexes for history (site, key), exports/changes by time (site, observed_at),
each region's latest succeeded run (site, status, finished_at) and a tick's
runs (site, tick).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BATCH = 5000


def _hash(data: Any) -> str:
    # Frozen copy of storage.content.content_hash as of this revision.
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _insert_ignore(conn: sa.Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return table.insert().prefix_with("OR IGNORE")


def upgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "contents",
        sa.Column("hash", sa.String(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_contents")),
    )
    with op.batch_alter_table("observations") as batch:
        batch.add_column(sa.Column("content_hash", sa.String(), nullable=True))

    obs = sa.table(
        "observations",
        sa.column("id", sa.BigInteger()),
        sa.column("data", JSON),
        sa.column("content_hash", sa.String()),
    )
    contents = sa.table("contents", sa.column("hash", sa.String()), sa.column("data", JSON))
    last = -1
    while True:
        rows = conn.execute(
            sa.select(obs.c.id, obs.c.data).where(obs.c.id > last).order_by(obs.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        hashed = [(r.id, _hash(r.data), r.data) for r in rows]
        unique = {h: d for _, h, d in hashed}
        conn.execute(
            _insert_ignore(conn, contents), [{"hash": h, "data": d} for h, d in unique.items()]
        )
        conn.execute(
            obs.update()
            .where(obs.c.id == sa.bindparam("oid"))
            .values(content_hash=sa.bindparam("h")),
            [{"oid": i, "h": h} for i, h, _ in hashed],
        )
        last = rows[-1].id

    with op.batch_alter_table("observations") as batch:
        batch.alter_column("content_hash", existing_type=sa.String(), nullable=False)
        batch.drop_column("data")
        batch.create_foreign_key(
            op.f("fk_observations_content_hash_contents"), "contents", ["content_hash"], ["hash"]
        )
    op.create_index("ix_observations_site_key", "observations", ["site", "key"])
    op.create_index("ix_observations_site_observed_at", "observations", ["site", "observed_at"])
    op.create_index("ix_runs_site_status_finished_at", "runs", ["site", "status", "finished_at"])
    op.create_index("ix_runs_site_tick", "runs", ["site", "tick"])


def downgrade() -> None:
    op.drop_index("ix_runs_site_tick", table_name="runs")
    op.drop_index("ix_runs_site_status_finished_at", table_name="runs")
    op.drop_index("ix_observations_site_observed_at", table_name="observations")
    op.drop_index("ix_observations_site_key", table_name="observations")
    with op.batch_alter_table("observations") as batch:
        batch.drop_constraint(op.f("fk_observations_content_hash_contents"), type_="foreignkey")
        batch.add_column(sa.Column("data", JSON, nullable=True))
    contents = sa.table("contents", sa.column("hash", sa.String()), sa.column("data", JSON))
    obs = sa.table("observations", sa.column("data", JSON), sa.column("content_hash", sa.String()))
    op.get_bind().execute(
        obs.update().values(
            data=sa.select(contents.c.data)
            .where(contents.c.hash == obs.c.content_hash)
            .scalar_subquery()
        )
    )
    with op.batch_alter_table("observations") as batch:
        batch.alter_column("data", existing_type=JSON, nullable=False)
        batch.drop_column("content_hash")
    op.drop_table("contents")
