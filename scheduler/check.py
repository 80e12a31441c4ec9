"""`geoscrape check FILE`: validate a sites file and summarise what it would run."""

from __future__ import annotations

import os

from scheduler.config import Config, Schedule, Site
from scheduler.loader import ConfigError, load_config


def check(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(0, summary) for a valid file; (1, every problem, one per line) otherwise."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return 1, str(exc)
    return 0, summarize(config)


def summarize(config: Config) -> str:
    """One headline, then one aligned line per site: name, engine, regions, schedule."""
    regions = ", ".join(config.regions)
    jobs = sum(len(site.regions) for site in config.sites)
    headline = (
        f"ok: {_count(len(config.regions), 'region')} ({regions}), "
        f"{_count(len(config.sites), 'site')}, {_count(jobs, 'job')} per full fan-out"
    )
    rows = [
        [
            site.name,
            _engine(site),
            ", ".join(site.regions),
            _schedule(site.schedule or config.defaults.schedule),
        ]
        for site in config.sites
    ]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    lines = [headline]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[3]]))
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _engine(site: Site) -> str:
    return f"{site.engine} ({site.spider})" if site.spider else site.engine


def _schedule(schedule: Schedule | None) -> str:
    if schedule is None or (schedule.every is None and schedule.cron is None):
        return "manual"
    if schedule.cron is not None:
        text = f"cron {schedule.cron} ({schedule.timezone})"
    else:
        assert schedule.every is not None
        text = f"every {_duration(schedule.every)}"
    if schedule.jitter:
        text += f", jitter {_duration(schedule.jitter)}"
    return text


def _duration(seconds: float) -> str:
    """The inverse of units.parse_duration, for display: 5400 -> "1h30m"."""
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)
