"""Dispatch: turn a site into one job per region on the bus (`crawl now`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from celery import Celery
from kombu import Connection

from regions.app import make_app, send_job
from regions.bus import connect, declare_topology, publish_ingest
from regions.messages import CodeRef, Job, RunQueued, dump, utcnow
from regions.site import DEPLOYED_PREFIX
from scheduler.config import Config
from scheduler.errors import SchedulerError


class DispatchError(SchedulerError):
    """A dispatch request that cannot be honoured (unknown site or region)."""


def plan_jobs(
    config: Config,
    site_name: str,
    regions: Sequence[str] | None = None,
    *,
    trigger: str = "manual",
    tick: str | None = None,
    pin_code: Callable[[str], CodeRef] | None = None,
    distributed: bool = False,
) -> list[Job]:
    """The jobs a dispatch would publish: one per region, each with a fresh run id.

    A `project: deployed:NAME` site's jobs pin the newest bundle of NAME, as
    `pin_code` (the store's storage.code.latest_bundle) names it. `distributed`
    runs the site as one run per region shared by that region's workers
    (scraper/frontier.py), as `distributed: true` in sites.yaml would.
    """
    try:
        site = config.site(site_name)
    except KeyError as exc:
        raise DispatchError(exc.args[0]) from None
    chosen = list(regions) if regions else site.regions
    for region in chosen:
        if region not in config.regions:
            declared = ", ".join(config.regions)
            raise DispatchError(f"region {region!r} is not declared (declared: {declared})")
        if region not in site.regions:
            raise DispatchError(
                f"site {site_name!r} does not run in region {region!r} "
                f"(its regions: {', '.join(site.regions)})"
            )
    resolved = config.resolved_site(site_name)
    code: CodeRef | None = None
    if resolved.project is not None and resolved.project.startswith(DEPLOYED_PREFIX):
        if pin_code is None:
            raise DispatchError(
                f"site {site_name!r} runs deployed code: dispatching it needs the store "
                "(GEOSCRAPE_DATABASE_URL) to pin the bundle"
            )
        try:
            code = pin_code(resolved.project.removeprefix(DEPLOYED_PREFIX))
        except Exception as exc:  # no such bundle, or the store is unreachable
            raise DispatchError(f"site {site_name!r}: {exc}") from exc
    if distributed and not resolved.distributed:
        if site.engine != "scrapy" or site.spider is not None:
            raise DispatchError(
                f"site {site_name!r}: --distributed needs engine 'scrapy' with the generic spider"
            )
        resolved = resolved.model_copy(update={"distributed": True})
    now = utcnow()
    return [
        Job(
            run_id=str(uuid.uuid4()),
            site=site_name,
            region=region,
            trigger=trigger,
            tick=tick,
            dispatched_at=now,
            config=resolved,
            code=code,
        )
        for region in chosen
    ]


def publish_jobs(jobs: Sequence[Job], broker_url: str | None = None) -> None:
    """Record each run as queued (via ingest), then publish its job to its region.

    The queued record goes first so that the store never sees a job run that
    it did not know was dispatched.
    """
    app = make_app(broker_url, regions={job.region for job in jobs})
    with connect(app.conf.broker_url) as conn:
        declare_topology(conn, {job.region for job in jobs})
        send_jobs(app, conn, jobs)


def send_jobs(app: Celery, conn: Connection, jobs: Sequence[Job]) -> None:
    """publish_jobs on an open connection whose topology is declared (the beat's)."""
    for job in jobs:
        publish_ingest(conn, dump(RunQueued.for_job(job)))
    with app.producer_or_acquire() as producer:
        for job in jobs:
            send_job(app, job, producer)
