"""Live progress of dispatched runs, read from the central store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from regions.messages import FINAL_STATUSES
from storage.errors import StorageError

if TYPE_CHECKING:  # rows only annotate: the store's modules load per command
    from storage.queries import RunRow

POLL_SECONDS = 0.5
# --wait reads the runs this often: one small query, and `crawl --wait` returns
# this much sooner after the last run is stored.
WAIT_POLL_SECONDS = 0.1


class WaitTimeout(StorageError):
    """Runs did not finish within the time the user allowed."""


def _table(runs: Sequence[RunRow], pending: set[str]) -> Table:
    table = Table("region", "status", "pages", "items", "errors", title="crawl progress")
    for run in runs:
        stats = run.stats or {}
        table.add_row(
            run.region,
            run.status,
            str(stats.get("pages", 0)),
            str(stats.get("items", 0)),
            str(stats.get("errors", 0)),
        )
    for run_id in sorted(pending):
        table.add_row("?", f"not yet seen by ingest ({run_id[:8]})", "-", "-", "-")
    return table


def _line(run: RunRow) -> str:
    stats = run.stats or {}
    return (
        f"{run.site} {run.region}: {run.status}, {stats.get('pages', 0)} pages, "
        f"{stats.get('items', 0)} items, {stats.get('errors', 0)} errors"
    )


# How long `crawl --wait` gives a region's workers to show up as consumers
# before it reports the region as unserved (a worker started at the same time
# as the crawl needs a few seconds to connect).
UNSERVED_GRACE_SECONDS = 60.0  # generous: a worker on a busy machine can take 30 s+
WORKED = frozenset({"running", "succeeded", "failed"})  # statuses only a worker sets


def unserved_regions(
    jobs: Sequence[tuple[str, str]], db_url: str, *, grace: float = UNSERVED_GRACE_SECONDS
) -> list[str]:
    """The queues ('scrape.<region>') of `jobs` (run id, region) that no worker
    consumes (the broker's consumer count) and whose run no worker started,
    after waiting up to `grace` seconds for either."""
    from regions.bus import connect, queue_depth, scrape_queue_name
    from storage.boundary import open_store
    from storage.queries import get_runs

    deadline = time.monotonic() + grace
    waiting = dict(jobs)
    sessions = None
    with connect() as conn:
        while True:
            for run_id, region in list(waiting.items()):
                depth = queue_depth(conn, scrape_queue_name(region))
                if depth is not None and depth[1] > 0:
                    del waiting[run_id]
            if waiting:
                try:
                    sessions = sessions or open_store(db_url)
                    with sessions() as session:
                        started = [
                            r.id for r in get_runs(session, list(waiting)) if r.status in WORKED
                        ]
                except StorageError:
                    started = []  # ingest may not have created the store yet
                for run_id in started:
                    waiting.pop(run_id, None)
            if not waiting or time.monotonic() > deadline:
                return sorted({scrape_queue_name(r) for r in waiting.values()})
            time.sleep(POLL_SECONDS)


def wait_for_runs(
    db_url: str,
    run_ids: Sequence[str],
    *,
    timeout: float = 3600,
    console: Console | None = None,
) -> list[RunRow]:
    """Poll the store until every run is final; show a live table (or lines when piped)."""
    from storage.db import make_engine, session_factory
    from storage.migrate import ensure_schema
    from storage.queries import get_runs

    console = console or Console()
    ensure_schema(db_url)  # ingest may not have created the tables yet
    sessions = session_factory(make_engine(db_url))
    deadline = time.monotonic() + timeout
    last_lines: dict[str, str] = {}
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live:
            live.start()
        while True:
            with sessions() as session:
                runs = get_runs(session, list(run_ids))
            pending = set(run_ids) - {r.id for r in runs}
            if live:
                live.update(_table(runs, pending), refresh=True)
            else:
                for run in runs:
                    line = _line(run)
                    if last_lines.get(run.id) != line:
                        console.print(line, highlight=False)
                        last_lines[run.id] = line
            if not pending and all(r.status in FINAL_STATUSES for r in runs):
                return runs
            if time.monotonic() > deadline:
                waiting = [r.region for r in runs if r.status not in FINAL_STATUSES]
                raise WaitTimeout(
                    f"runs not finished after {timeout:.0f}s (still waiting: "
                    f"{', '.join(waiting) or 'ingest has not seen them'}); is a worker "
                    "running for each region, and is 'geoscrape ingest' running?"
                )
            time.sleep(WAIT_POLL_SECONDS)
    finally:
        if live:
            live.stop()
