"""The regional worker: consumes only `scrape.<region>` and runs each crawl.

A crawl runs in a fresh child process (scraper.runner), so this long-lived
process never starts a Twisted reactor and does not grow from crawl to crawl.
The worker holds broker credentials only: results go back over `ingest`.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from pydantic import BaseModel

from regions.app import CRAWL_TASK, make_app
from regions.bus import connect, declare_topology, publish_ingest, scrape_queue_name
from regions.errors import UnknownRegion
from regions.messages import Job, dump

log = logging.getLogger("geoscrape.worker")


def check_region(region: str, declared: list[str]) -> None:
    if region not in declared:
        raise UnknownRegion(
            f"region {region!r} is not declared in the config "
            f"(declared: {', '.join(declared) or 'none'})"
        )


def worker_app(region: str, url: str | None = None) -> Celery:
    """A Celery app whose only task crawls jobs of `region`."""
    app = make_app(url, regions=[region])
    hostname = socket.gethostname()

    @app.task(name=CRAWL_TASK, bind=True)
    def crawl(self: Any, job_body: dict[str, Any]) -> None:
        # Imported here so `geoscrape worker --help` stays fast.
        from scraper.runner import run_job

        job = Job.model_validate(job_body)
        if job.region != region:
            # Never run another region's job from here: park it for a human.
            raise Reject(f"job for region {job.region!r} reached {region!r}", requeue=False)
        log.info("run %s: crawling site %r in region %s", job.run_id, job.site, region)
        with connect(app.conf.broker_url) as conn:

            def publish(message: BaseModel) -> None:
                publish_ingest(conn, dump(message))

            finished = run_job(job, publish, worker=f"{region}@{hostname}")
        log.info(
            "run %s: %s, %d pages, %d items",
            job.run_id,
            finished.status,
            finished.stats.pages,
            finished.stats.items,
        )

    return app


def run_worker(region: str, *, concurrency: int = 1, url: str | None = None) -> None:
    """Run a worker for `region` in the foreground until stopped (SIGTERM/SIGINT)."""
    app = worker_app(region, url)
    with connect(app.conf.broker_url) as conn:
        conn.ensure_connection(max_retries=3)
        declare_topology(conn, [region])
    app.worker_main(
        argv=[
            "worker",
            f"--queues={scrape_queue_name(region)}",
            f"--hostname={region}@%h",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
