"""The regional worker: consumes only `scrape.<region>` and runs each crawl.

A crawl runs in a fresh child process (scraper.runner), so this long-lived
process never starts a Twisted reactor and does not grow from crawl to crawl.
The worker holds broker credentials only: results go back over `ingest`.

It declares nothing: its broker user may only read `scrape.<region>` and write
to the `ingest` exchange (docs/REGIONS.md). At start it waits, checking
passively, until central components have declared its queue and `ingest`.

A job is acked when its crawl starts, right after RunStarted is confirmed by
the broker (not after the crawl: RabbitMQ 3.10's consumer_timeout would close
the channel of a long crawl and redeliver it). From then on the run's
heartbeats are its lease: ingest's reaper (storage/reaper.py) redelivers a run
whose heartbeats stop, and dead-letters it after GEOSCRAPE_MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.worker.request import Request
from pydantic import BaseModel

from regions.app import CRAWL_TASK, make_app
from regions.bus import connect, missing_topology, publish_ingest, redact, scrape_queue_name
from regions.errors import UnknownRegion
from regions.heartbeat import Heartbeat, worker_name
from regions.messages import Job, dump, expired_run, utcnow

log = logging.getLogger("geoscrape.worker")


def check_region(region: str, declared: list[str]) -> None:
    if region not in declared:
        raise UnknownRegion(
            f"region {region!r} is not declared in the config "
            f"(declared: {', '.join(declared) or 'none'})"
        )


class DeliveryLost(RuntimeError):
    """The job's delivery died with its channel before the crawl started: not run.

    The broker requeued it when the channel closed, so it runs elsewhere.
    """


_accepted = threading.local()  # the Request a pool thread is about to run


class CrawlRequest(Request):
    """Remembers, in the pool thread, the request whose task runs next there.

    Celery calls on_accepted and then the task in the same thread (threads and
    solo pools), so the task can ack its own delivery at crawl start.
    """

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        _accepted.request = self
        super().on_accepted(pid, time_accepted)


def ack_delivery(task_id: str) -> None:
    """Ack the delivery of the task running in this thread; DeliveryLost if impossible.

    A reserved job whose channel was closed meanwhile (e.g. by consumer_timeout)
    cannot be acked and was requeued by the broker: running it here as well
    would run it twice, so the ack must succeed before the crawl starts.
    """
    request: Request | None = getattr(_accepted, "request", None)
    if request is None or request.id != task_id:
        raise DeliveryLost(f"no delivery to ack for task {task_id}")
    if request.acknowledged:
        return
    try:
        request.message.ack()
    except Exception as exc:  # channel or connection gone
        raise DeliveryLost(f"cannot ack job {task_id} ({exc!r}): not run here") from exc
    request.acknowledged = True  # Celery's own late ack becomes a no-op


def worker_app(region: str, url: str | None = None) -> Celery:
    """A Celery app whose only task crawls jobs of `region`."""
    app = make_app(url, regions=[region], declare=False)
    name = worker_name(region)

    # acks_late (app default) keeps the job unacked until the task acks it
    # itself at crawl start (ack_delivery); a wrong-region job can still be
    # rejected to scrape.dead before that.
    @app.task(name=CRAWL_TASK, bind=True, Request=CrawlRequest)
    def crawl(self: Any, job_body: dict[str, Any]) -> None:
        # Imported here so `geoscrape worker --help` stays fast.
        from scraper.runner import run_job

        job = Job.model_validate(job_body)
        if job.region != region:
            # Never run another region's job from here: park it for a human.
            raise Reject(f"job for region {job.region!r} reached {region!r}", requeue=False)
        if job.expires_at is not None and utcnow() >= job.expires_at:
            # Its site's next tick came first: record it as expired, never run it late.
            log.info("run %s: expired at %s, not run", job.run_id, job.expires_at.isoformat())
            with connect(app.conf.broker_url) as conn:
                publish_ingest(conn, dump(expired_run(job)))
            return
        log.info(
            "run %s: crawling site %r in region %s (attempt %d)",
            job.run_id,
            job.site,
            region,
            job.attempt,
        )
        with connect(app.conf.broker_url) as conn:

            def publish(message: BaseModel) -> None:
                publish_ingest(conn, dump(message))

            task_id = str(self.request.id)
            with _busy:
                finished = run_job(
                    job, publish, worker=name, on_started=lambda: ack_delivery(task_id)
                )
        log.info(
            "run %s: %s, %d pages, %d items",
            job.run_id,
            finished.status,
            finished.stats.pages,
            finished.stats.items,
        )

    return app


class _Busy:
    """How many crawls of its own this worker process runs right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.crawls = 0

    def __enter__(self) -> None:
        with self._lock:
            self.crawls += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.crawls -= 1


_busy = _Busy()  # one worker per process


def participate(job: Job, url: str, region: str) -> None:
    """Take part in another worker's distributed run until it closes (scraper/distributed.py)."""
    from scraper.runner import run_job

    with connect(url) as conn:

        def publish(message: BaseModel) -> None:
            publish_ingest(conn, dump(message))

        finished = run_job(job, publish, worker=worker_name(region), participant=True)
    log.info("run %s: took part, %d pages", job.run_id, finished.stats.pages)


def run_worker(region: str, *, concurrency: int = 1, url: str | None = None) -> None:
    """Run a worker for `region` in the foreground until stopped (SIGTERM/SIGINT)."""
    from scraper.distributed import Joiner

    app = worker_app(region, url)
    wait_for_topology(app.conf.broker_url, region)
    warm = _start_warm_children()
    heartbeat = Heartbeat(app.conf.broker_url, region).start()
    broker = app.conf.broker_url
    joiner = Joiner(
        region,
        is_free=lambda: _busy.crawls == 0,
        participate=lambda job: participate(job, broker, region),
    ).start()
    try:
        _worker_main(app, region, concurrency)
    finally:
        joiner.stop()
        heartbeat.stop()
        if warm:
            from scraper.runner import stop_warm_children

            stop_warm_children()


def _start_warm_children() -> bool:
    """Crawls fork from a warm server unless GEOSCRAPE_WARM_CHILDREN=0 (scraper/forkserver.py)."""
    if os.environ.get("GEOSCRAPE_WARM_CHILDREN", "1") == "0":
        return False
    from scraper.errors import ScraperError
    from scraper.runner import start_warm_children

    try:
        start_warm_children()
    except (OSError, ScraperError) as exc:  # crawls still run, each in a fresh process
        log.warning("no warm crawl processes (%s): each crawl starts a fresh one", exc)
        return False
    return True


def wait_for_topology(url: str, region: str, *, interval: float = 2.0) -> None:
    """Block until `scrape.<region>` and `ingest` exist (declared centrally)."""
    said = 0.0
    while True:
        with connect(url) as conn:
            conn.ensure_connection(max_retries=3)
            missing = missing_topology(conn, [region])
        if not missing:
            return
        if time.monotonic() - said > 60:
            log.warning(
                "waiting for queue(s) %s on %s: declare them with 'geoscrape broker provision "
                "--apply' (or start ingest / dispatch a crawl as the central user)",
                ", ".join(missing),
                redact(url),
            )
            said = time.monotonic()
        time.sleep(interval)


def _worker_main(app: Celery, region: str, concurrency: int) -> None:
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
