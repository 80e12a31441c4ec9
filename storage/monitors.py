"""Per-region data-quality monitors: a site's `expect:` checks on a finished run.

Evaluated centrally by the writer when a run's `succeeded` verdict arrives;
a run that fails a check is stored as `degraded` with the reasons (runs.reasons):

- ``items``: ``items: {min: N}``, fewer items than N;
- ``coverage:<field>``: ``coverage: {price: 0.95}``, the share of the run's items
  with the field non-empty is below the bound;
- ``drop``: ``drop: 50%``, items below (1 - 50%) x the median of the region's
  last ``drop_runs`` succeeded runs (needs at least one earlier run);
- ``status``: ``status: {max_errors: 5%}``, the share of fetches that failed or
  answered >= 400 is above the bound.

Item counts come from the run's own stats (the worker's count, which is in the
verdict itself); coverage reads the run's observations, which the worker sends
before its verdict on the same channel.
"""

from __future__ import annotations

import statistics
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from regions.messages import RunStats
from regions.site import Expect
from storage.models import contents, newest_first, observations, runs


class Reason(BaseModel):
    """One failed check."""

    model_config = ConfigDict(frozen=True)
    check: str  # items | coverage:<field> | drop | status
    message: str


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _coverage(session: Session, run_id: str, fields: list[str]) -> tuple[int, dict[str, int]]:
    stmt = (
        select(contents.c.data)
        .join(observations, observations.c.content_hash == contents.c.hash)
        .where(observations.c.run_id == run_id)
    )
    total, filled = 0, dict.fromkeys(fields, 0)
    for (data,) in session.execute(stmt):
        total += 1
        for field in fields:
            if not _empty(data.get(field)):
                filled[field] += 1
    return total, filled


def _earlier_counts(session: Session, site: str, region: str, run_id: str, limit: int) -> list[int]:
    stmt = (
        select(runs.c.stats)
        .where(
            runs.c.site == site,
            runs.c.region == region,
            runs.c.status == "succeeded",
            runs.c.id != run_id,
        )
        .order_by(*newest_first())
        .limit(limit)
    )
    return [int((stats or {}).get("items", 0)) for (stats,) in session.execute(stmt)]


def evaluate(
    session: Session, run_id: str, site: str, region: str, stats: RunStats, expect: Expect
) -> list[Reason]:
    """The checks of ``expect`` this run fails (empty: healthy)."""
    reasons: list[Reason] = []
    if expect.items is not None and stats.items < expect.items.min:
        reasons.append(
            Reason(check="items", message=f"{stats.items} items < min {expect.items.min}")
        )
    if expect.coverage:
        total, filled = _coverage(session, run_id, list(expect.coverage))
        for field, least in expect.coverage.items():
            share = filled[field] / total if total else 0.0
            if share < least:
                reasons.append(
                    Reason(
                        check=f"coverage:{field}",
                        message=f"{field} filled in {share:.0%} of {total} items < {least:.0%}",
                    )
                )
    if expect.drop is not None:
        earlier = _earlier_counts(session, site, region, run_id, expect.drop_runs)
        if earlier:
            median = statistics.median(earlier)
            if stats.items < (1 - expect.drop) * median:
                reasons.append(
                    Reason(
                        check="drop",
                        message=(
                            f"{stats.items} items, more than {expect.drop:.0%} below the median "
                            f"{median:g} of the last {len(earlier)} runs"
                        ),
                    )
                )
    if expect.status is not None:
        refused = sum(n for code, n in stats.status_codes.items() if int(code) >= 400)
        total = stats.pages + stats.errors
        share = (refused + stats.errors) / total if total else 0.0
        if share > expect.status.max_errors:
            reasons.append(
                Reason(
                    check="status",
                    message=(
                        f"{share:.0%} of {total} fetches failed > {expect.status.max_errors:.0%}"
                    ),
                )
            )
    return reasons
