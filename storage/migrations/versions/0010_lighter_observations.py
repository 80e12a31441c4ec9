"""Cheaper observation writes: drop an unused index and the content_hash check.

- ix_observations_site_region_key: no query needs it. A key's history (site,
  key[, region]) uses ix_observations_site_key, exports and changes (site[,
  region], by time) ix_observations_site_observed_at, a run's observations the
  (run_id, key) constraint.
- fk_observations_content_hash_contents: the writer stores an observation's
  content in the same transaction, before it (storage.writer), and contents
  are never deleted; the check cost a row lock per observation (a third of
  the observations insert).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_observations_site_region_key", table_name="observations")
    with op.batch_alter_table("observations") as batch:
        batch.drop_constraint(op.f("fk_observations_content_hash_contents"), type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("observations") as batch:
        batch.create_foreign_key(
            op.f("fk_observations_content_hash_contents"), "contents", ["content_hash"], ["hash"]
        )
    op.create_index("ix_observations_site_region_key", "observations", ["site", "region", "key"])
