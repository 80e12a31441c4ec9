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

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery, bootsteps
from celery.exceptions import Reject
from celery.worker.request import Request
from kombu import Connection
from pydantic import BaseModel, ValidationError

from regions.app import CRAWL_TASK, make_app
from regions.bus import connect, missing_topology, publish_ingest, redact, scrape_queue_name
from regions.errors import BadSourceAddress, CrawlAborted, RegionsError, UnknownRegion
from regions.heartbeat import Heartbeat, worker_name
from regions.messages import (
    EgressAttestation,
    ExitReport,
    Job,
    RunFinished,
    RunProgress,
    RunReleased,
    cancelled_run,
    dump,
    expired_run,
    utcnow,
)
from regions.settings import settings
from regions.stopping import DEFAULT_STOP_TIMEOUT, StopControl

log = logging.getLogger("geoscrape.worker")


def check_region(region: str, declared: list[str]) -> None:
    if region not in declared:
        raise UnknownRegion(
            f"region {region!r} is not declared in the config "
            f"(declared: {', '.join(declared) or 'none'})"
        )


def check_source_address(address: str) -> None:
    """Fail at start, not per request, if this machine cannot send from `address`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        raise BadSourceAddress(
            f"egress.source_address {address}: cannot send from it on this machine "
            f"({exc.strerror or exc}); give an address of one of its interfaces"
        ) from None


class RunNotSucceeded(RegionsError):
    """The crawl task's outcome for Celery when its run did not succeed (no traceback:
    it is an expected outcome, recorded in the store)."""


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


def parse_job(body: Any) -> Job:
    """The job of a crawl task. One that does not validate (another schema
    version, a config this code cannot run) is rejected to scrape.dead, where
    ingest keeps it in bad_messages with the reason: never run, never lost."""
    try:
        return Job.model_validate(body)
    except ValidationError as exc:
        raise Reject(f"not a valid job: {exc}", requeue=False) from exc


# A pool thread keeps its connection for publishing results from one crawl to the
# next: opening one (TCP, AMQP handshake, confirms) cost a few ms of every one-page
# job. One idle longer than this is closed instead of reused: nothing sends its
# heartbeats between crawls, and the broker drops a connection silent for 60 s.
PUBLISHER_IDLE_SECONDS = 10.0

_publisher = threading.local()  # (connection, url, idle since) of this pool thread


@contextlib.contextmanager
def publishing(url: str) -> Iterator[Connection]:
    """This pool thread's connection for publishing to ingest, reused while fresh
    (PUBLISHER_IDLE_SECONDS). When the block raises it is closed, not kept: the
    next crawl starts on a new one."""
    held = getattr(_publisher, "held", None)
    _publisher.held = None
    conn: Connection | None = None
    if held is not None:
        conn, held_url, idle_since = held
        if held_url != url or time.monotonic() - idle_since > PUBLISHER_IDLE_SECONDS:
            _close(conn)
            conn = None
    conn = conn or connect(url)
    try:
        yield conn
    except BaseException:
        _close(conn)
        raise
    _publisher.held = (conn, url, time.monotonic())


def _close(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to close cleanly
        conn.release()


class CrawlRunner(Protocol):
    """Runs one job to its end (scraper.runner.run_job), publishing every message
    through `publish`; calls `on_started` once its run_started is confirmed;
    raises CrawlAborted once `should_abort()` turns true."""

    def __call__(
        self,
        job: Job,
        publish: Callable[[BaseModel], None],
        *,
        worker: str,
        on_started: Callable[[], None],
        egress: Any = None,
        attestation: EgressAttestation | None = None,
        should_abort: Callable[[], bool] | None = None,
        participant: bool = False,
    ) -> RunFinished: ...


class Egress(Protocol):
    """The region's egress exits and their verification (scraper.verify.RegionEgress,
    handed in by the CLI: regions sits below scraper)."""

    on_change: Callable[[], Any] | None

    def open(self) -> bool:
        """Is some exit usable now (or is the region direct and unverified)?"""

    def for_job(self) -> tuple[Any, EgressAttestation] | None:
        """The exits for one crawl and their attestation; None: no verified exit."""

    def reports(self) -> list[ExitReport] | None:
        """Each exit's verification state, for the heartbeat."""

    def start(self) -> Any: ...

    def stop(self) -> None: ...


GATE_INTERVAL = 1.0  # seconds between checks of the egress gate


def egress_gate(egress: Egress, queue: str) -> type[bootsteps.StartStopStep]:
    """A consumer step that consumes `queue` only while some exit is usable.

    It runs in the consumer's event loop (its timer), where touching the
    consumer is safe; it starts before the loop does, so a region whose exits
    all failed their first verification never receives a job.
    """

    class EgressGate(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.consuming = True
            self.tref: Any = None

        def start(self, c: Any) -> None:
            self.consuming = True  # the worker starts with --queues=<queue>
            self.tick(c)
            self.tref = c.timer.call_repeatedly(GATE_INTERVAL, self.tick, (c,), priority=10)

        def tick(self, c: Any) -> None:
            usable = egress.open()
            if usable and not self.consuming:
                log.info("egress verified again: consuming %s", queue)
                c.add_task_queue(queue)
            elif not usable and self.consuming:
                log.warning("no verified egress exit: not consuming %s", queue)
                c.cancel_task_queue(queue)
            self.consuming = usable

        def stop(self, c: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

    return EgressGate


def worker_app(
    region: str,
    run_job: CrawlRunner,
    egress: Egress,
    url: str | None = None,
    *,
    source_address: str | None = None,
    events: bool = False,
    control: StopControl | None = None,
    cancelled: Callable[[str], bool] | None = None,
) -> Celery:
    """A Celery app whose only task crawls jobs of `region` with `run_job`, through its egress.

    `source_address`: the region's egress.source_address, which every crawl
    sends from. `events`: send Celery task events (Flower, `celery events`).

    `control` (regions/stopping.py) aborts crawls on a second stop signal:
    the run is then handed back (RunReleased) rather than finished.

    `cancelled(run_id)` says whether `geoscrape cancel` marked the run
    (scheduler.cancel.CancelMarks, handed in by the CLI): such a job is dropped
    when delivered, and its crawl aborted while it runs.
    """
    is_cancelled = cancelled or (lambda _run_id: False)
    app = make_app(url, regions=[region], declare=False)
    if events:
        app.conf.update(worker_send_task_events=True, task_send_sent_event=True)
    name = worker_name(region)
    app.steps["consumer"].add(egress_gate(egress, scrape_queue_name(region)))
    stop = control or StopControl()

    # acks_late (app default) keeps the job unacked until the task acks it
    # itself at crawl start (ack_delivery); a wrong-region job can still be
    # rejected to scrape.dead before that.
    @app.task(name=CRAWL_TASK, bind=True, Request=CrawlRequest, throws=(RunNotSucceeded,))
    def crawl(self: Any, job_body: dict[str, Any]) -> None:
        job = parse_job(job_body)
        if job.region != region:
            # Never run another region's job from here: park it for a human.
            raise Reject(f"job for region {job.region!r} reached {region!r}", requeue=False)
        if source_address is not None:
            # The region's egress belongs to the worker's machine, not the dispatcher.
            job = job.model_copy(
                update={"config": job.config.model_copy(update={"source_address": source_address})}
            )
        if is_cancelled(job.run_id):
            log.info("run %s: cancelled before it started, not run", job.run_id)
            with connect(app.conf.broker_url) as conn:
                reason = f"dropped by {name} before it started"
                publish_ingest(conn, dump(cancelled_run(job.run_id, job.site, region, reason)))
            raise RunNotSucceeded(f"run {job.run_id} cancelled")
        if job.expires_at is not None and utcnow() >= job.expires_at:
            # Its site's next tick came first: record it as expired, never run it late.
            log.info("run %s: expired at %s, not run", job.run_id, job.expires_at.isoformat())
            with connect(app.conf.broker_url) as conn:
                publish_ingest(conn, dump(expired_run(job)))
            return
        plan = egress.for_job()
        if plan is None:
            # Fail closed: never run through an unverified exit. Back to the
            # queue; the gate stops this worker from taking it again meanwhile.
            log.warning("run %s: no verified egress exit, job requeued", job.run_id)
            raise Reject("no verified egress exit", requeue=True)
        child_egress, attestation = plan
        log.info(
            "run %s: crawling site %r in region %s (attempt %d) via %s",
            job.run_id,
            job.site,
            region,
            job.attempt,
            ", ".join(e.proxy for e in attestation.exits),
        )
        with publishing(app.conf.broker_url) as conn:

            def publish(message: BaseModel) -> None:
                if isinstance(message, RunProgress):
                    stop.progress(job.run_id, message.stats.pages)
                publish_ingest(conn, dump(message))

            task_id = str(self.request.id)
            stop.started(job)
            try:
                with _busy:
                    finished = run_job(
                        job,
                        publish,
                        worker=name,
                        on_started=lambda: ack_delivery(task_id),
                        egress=child_egress,
                        attestation=attestation,
                        should_abort=lambda: stop.abort.is_set() or is_cancelled(job.run_id),
                    )
            except CrawlAborted as aborted:
                if is_cancelled(job.run_id):
                    reason = f"crawl aborted by {name} after {aborted.pages} pages, items kept"
                    publish(
                        cancelled_run(job.run_id, job.site, region, reason, stats=aborted.stats)
                    )
                    log.warning("run %s: cancelled; %s", job.run_id, aborted)
                    raise RunNotSucceeded(f"run {job.run_id} cancelled") from None
                publish(
                    RunReleased(
                        run_id=job.run_id,
                        site=job.site,
                        region=job.region,
                        worker=name,
                        released_at=utcnow(),
                        reason=f"worker stopping after {aborted.pages} pages",
                    )
                )
                log.warning("run %s: %s; handed back to %s", job.run_id, aborted, region)
                return
            finally:
                stop.finished(job.run_id)
        log.info(
            "run %s: %s, %d pages, %d items",
            job.run_id,
            finished.status,
            finished.stats.pages,
            finished.stats.items,
        )
        if finished.status != "succeeded":
            # Celery's own state ("Task ... raised expected") says the run failed, too.
            raise RunNotSucceeded(
                f"run {job.run_id} {finished.status}: {finished.error or ''}"[:500]
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


@dataclass
class CrawlPool:
    """What the worker needs from the crawl layer besides the runner, handed in by
    the CLI (regions sits below scraper): the fork server of warm crawl processes
    (scraper.runner.start/stop_warm_children) and the joiner of distributed runs
    (scraper.distributed.Joiner)."""

    start_warm: Callable[[], object] | None = None
    stop_warm: Callable[[], None] | None = None
    joiner: Callable[..., Any] | None = None


def participate(
    job: Job,
    url: str,
    region: str,
    run_job: CrawlRunner,
    cancelled: Callable[[str], bool] = lambda _run_id: False,
) -> None:
    """Take part in another worker's distributed run until it closes (scraper/distributed.py)
    or is cancelled."""
    with connect(url) as conn:

        def publish(message: BaseModel) -> None:
            publish_ingest(conn, dump(message))

        try:
            finished = run_job(
                job,
                publish,
                worker=worker_name(region),
                on_started=lambda: None,
                participant=True,
                should_abort=lambda: cancelled(job.run_id),
            )
        except CrawlAborted as aborted:
            log.warning("run %s: cancelled; left it after %d pages", job.run_id, aborted.pages)
            return
    log.info("run %s: took part, %d pages", job.run_id, finished.stats.pages)


def run_worker(
    region: str,
    run_job: CrawlRunner,
    *,
    concurrency: int = 1,
    egress: Egress,
    url: str | None = None,
    source_address: str | None = None,
    events: bool = False,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    pool: CrawlPool | None = None,
    cancelled: Callable[[str], bool] | None = None,
) -> None:
    """Run a worker for `region` in the foreground until stopped (SIGTERM/SIGINT).

    With a verified `egress`, every exit is verified before the first job. The
    first signal finishes the crawls in progress; a second one (or
    `stop_timeout` seconds) hands them back (regions/stopping.py).
    """
    pool = pool or CrawlPool()
    if source_address is not None:
        check_source_address(source_address)
    control = StopControl(stop_timeout).connect()
    app = worker_app(
        region,
        run_job,
        egress,
        url,
        source_address=source_address,
        events=events,
        control=control,
        cancelled=cancelled,
    )
    wait_for_topology(app.conf.broker_url, region)
    warm = _start_warm_children(pool)
    heartbeat = Heartbeat(
        app.conf.broker_url, region, exits=egress.reports, egress=source_address
    ).start()
    egress.on_change = heartbeat.beat  # a verdict that changed is reported at once
    broker = app.conf.broker_url
    joiner = (
        pool.joiner(
            region,
            is_free=lambda: _busy.crawls == 0,
            participate=lambda job: participate(
                job, broker, region, run_job, cancelled or (lambda _run_id: False)
            ),
        ).start()
        if pool.joiner is not None
        else None
    )
    try:
        egress.start()
        _worker_main(app, region, concurrency)
    finally:
        if joiner is not None:
            joiner.stop()
        egress.stop()
        heartbeat.stop()
        control.disconnect()
        if warm and pool.stop_warm is not None:
            pool.stop_warm()


def _start_warm_children(pool: CrawlPool) -> bool:
    """Crawls fork from a warm server unless GEOSCRAPE_WARM_CHILDREN=0 (scraper/forkserver.py)."""
    if pool.start_warm is None or not settings().warm_children:
        return False
    try:
        pool.start_warm()
    except Exception as exc:  # crawls still run, each in a fresh process
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
