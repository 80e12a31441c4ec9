"""What the dashboard pages show, read from the store (and the broker for queue depths).

Each function returns plain typed rows; the templates only render them. The
broker is optional: when it cannot be reached the overview still shows the
store, with queue depths unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from regions.messages import FINAL_STATUSES, utcnow
from storage import queries
from storage.deadletter import DeadJobRow, list_dead_jobs
from storage.errors import NotFoundError, QueryError
from storage.queries import RunRow, WorkerRow, last_runs, live_workers
from storage.runinfo import RunPage, run_page

log = logging.getLogger("geoscrape.dashboard")


@dataclass(frozen=True)
class RegionRow:
    name: str
    workers: list[WorkerRow]
    egress: list[str]  # distinct egress addresses the live workers report
    waiting: int | None  # ready jobs in scrape.<region>; None: unknown
    consumers: int | None
    queue_note: str = ""  # why depth is unknown
    configured: str | None = None  # the region's egress.source_address in the sites file

    @property
    def egress_verified(self) -> bool:
        """Every live worker reports the configured source address, which a worker
        only does after checking at start that it can send from it."""
        return (
            bool(self.workers) and self.configured is not None and self.egress == [self.configured]
        )


@dataclass(frozen=True)
class SiteRow:
    name: str
    schedule: str  # "every 1h", "cron 0 * * * * (UTC)", "manual", "-" (not in the config)
    next_fire: datetime | None
    last: dict[str, RunRow]  # region -> newest run


@dataclass(frozen=True)
class Overview:
    regions: list[RegionRow]
    sites: list[SiteRow]
    in_progress: list[RunRow]
    config_note: str = ""


def queue_depths(broker_url: str | None, regions: list[str]) -> tuple[dict[str, Any], str]:
    """(region -> (ready, consumers) or None, problem); problem is "" on success."""
    from regions.bus import connect, queue_depth, scrape_queue_name

    try:
        with connect(broker_url) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            return {r: queue_depth(conn, scrape_queue_name(r)) for r in regions}, ""
    except Exception as exc:  # the dashboard shows the store when the broker is down
        return {}, f"broker unreachable ({type(exc).__name__})"


def _config(path: Path | None) -> tuple[Any, str]:
    if path is None:
        return None, "no sites file (GEOSCRAPE_CONFIG): schedules unknown"
    from scheduler.errors import SchedulerError
    from scheduler.loader import load_config

    try:
        return load_config(path), ""
    except (SchedulerError, OSError) as exc:
        return None, f"sites file {path}: {str(exc).splitlines()[0]}"


def _schedule(config: Any, site: str) -> tuple[str, datetime | None]:
    from scheduler.schedule import Timing, effective_schedule

    if config is None or site not in {s.name for s in config.sites}:
        return "-", None
    schedule = effective_schedule(config, site)
    if schedule is None:
        return "manual", None
    text = f"every {schedule.every:g}s" if schedule.every else f"cron {schedule.cron}"
    return f"{text} ({schedule.timezone})", Timing(site, schedule).next_after(utcnow())


def overview(session: Session, broker_url: str | None, config_path: Path | None) -> Overview:
    from regions.heartbeat import LIVE_WITHIN

    workers = live_workers(session, seen_since=utcnow() - LIVE_WITHIN)
    latest = last_runs(session)
    config, note = _config(config_path)
    declared = list(config.regions) if config is not None else []
    names = list(dict.fromkeys([*declared, *(w.region for w in workers)]))
    names += sorted({r.region for r in latest} - set(names))
    depths, problem = queue_depths(broker_url, names)
    regions = []
    for name in names:
        mine = [w for w in workers if w.region == name]
        depth = depths.get(name)
        regions.append(
            RegionRow(
                name=name,
                workers=mine,
                egress=sorted({w.egress for w in mine if w.egress}),
                waiting=depth[0] if depth else None,
                consumers=depth[1] if depth else None,
                queue_note=problem or ("" if depth else "no queue yet"),
                configured=(
                    config.region(name).egress.source_address
                    if config is not None and name in config.regions
                    else None
                ),
            )
        )
    site_names = list(dict.fromkeys([*(s.name for s in config.sites)] if config else []))
    site_names += sorted({r.site for r in latest} - set(site_names))
    sites = []
    for site in site_names:
        text, next_fire = _schedule(config, site)
        last = {r.region: r for r in latest if r.site == site}
        sites.append(SiteRow(site, text, next_fire, last))
    return Overview(regions, sites, in_progress(session), note)


def in_progress(session: Session) -> list[RunRow]:
    return queries.in_progress(session)


def site_runs(session: Session, site: str, limit: int = 200) -> list[RunRow]:
    """The site's newest runs, newest first."""
    return queries.list_runs(session, site=site, limit=limit)


def run_detail(session: Session, run_id: str) -> RunPage | None:
    """None for an unknown (or ambiguous) run id: the page answers 404."""
    try:
        return run_page(session, run_id)
    except (NotFoundError, QueryError):
        return None


def dead_jobs(session: Session) -> list[DeadJobRow]:
    return list_dead_jobs(session)


def history_series(
    session: Session, site: str, key: str, field_name: str, days: int = 30
) -> dict[str, Any]:
    """uPlot-ready data: {"regions": [...], "x": [unix s...], "y": [[per region]...]}.

    Each history entry is a stretch of runs that saw one value, so it becomes
    two points (first and last seen), making a step line per region.
    """
    from datetime import timedelta

    from storage.history import history

    since = utcnow() - timedelta(days=days)
    result = history(session, site, key, fields=[field_name])
    points: dict[str, dict[float, float | None]] = {}
    for entry in result.entries:
        if entry.last_at < since:
            continue
        value = (entry.values or {}).get(field_name) if entry.seen else None
        number = value if isinstance(value, int | float) else None
        series = points.setdefault(entry.region, {})
        for moment in (max(entry.first_at, since), entry.last_at):
            series[moment.timestamp()] = number
    regions = sorted(points)
    xs = sorted({x for series in points.values() for x in series})
    ys = [[points[r].get(x) for x in xs] for r in regions]
    return {"site": site, "key": key, "field": field_name, "regions": regions, "x": xs, "y": ys}


def runs_series(session: Session, site: str, limit: int = 500) -> dict[str, Any]:
    """uPlot-ready items per run, per region, by the run's queue time (newest `limit` runs)."""
    points: dict[str, dict[float, float]] = {}
    for run in site_runs(session, site, limit=limit):
        when = run.queued_at or run.started_at or run.finished_at
        if when is None or run.status not in FINAL_STATUSES:
            continue
        points.setdefault(run.region, {})[when.timestamp()] = float(run.stats.get("items", 0))
    regions = sorted(points)
    xs = sorted({x for series in points.values() for x in series})
    ys = [[points[r].get(x) for x in xs] for r in regions]
    return {"site": site, "field": "items per run", "regions": regions, "x": xs, "y": ys}
