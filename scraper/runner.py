"""Parent side of a crawl: runs inside the long-lived regional worker.

`run_job` spawns `python -m scraper.child` (a fresh process per crawl: Twisted's
reactor cannot restart, and long-lived crawlers leak), feeds it the Job, turns
its events into bus messages and hands them to `publish`:

    RunStarted, then ItemBatch (seq 0, 1, ...) and RunProgress as the crawl goes,
    then the last ItemBatch and RunFinished (also returned).

This module must not import Scrapy or Twisted (tests check it).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from pydantic import BaseModel

import scraper
from regions.messages import (
    CodeRef,
    EgressAttestation,
    Fetch,
    Job,
    RunFinished,
    RunProgress,
    RunStarted,
    RunStats,
    ScrapedItem,
    utcnow,
)
from scraper.batching import Batcher
from scraper.code import CODE_PATH_ENV, CODE_TOKEN_ENV, CodeError
from scraper.distributed import RunBoard, is_distributed
from scraper.egress import EGRESS_ENV, ChildEgress
from scraper.errors import CrawlAborted
from scraper.protocol import Done, ProtocolError, Release, StatsTracker, decode_event
from scraper.warm import WarmChild, WarmChildren

log = logging.getLogger(__name__)

CHILD_MODULE = "scraper.child"
STDERR_TAIL_LINES = 40  # kept from the child's stderr for the failure message
STDERR_LINE_MAX = 2000  # longer stderr lines are cut into pieces of this size
ERROR_MAX_CHARS = 4000
EXIT_GRACE_SECONDS = 30.0  # after "done", how long the child may take to exit
EVENT_QUEUE_MAX = 10_000  # protocol lines read ahead of publishing
# The crawl stops itself at limits.max_duration; past this much more it is killed.
DURATION_GRACE_SECONDS = 60.0
ABORT_POLL_SECONDS = 0.2  # how soon should_abort() is seen
# Distributed runs: once the child has said nothing for this long, the pages it
# released are published and acked at once (not at the batch's deadline): the
# run's end waits for its last leases, and a busy crawl is never this quiet.
RELEASE_IDLE_SECONDS = 0.05

_PR_SET_PDEATHSIG = 1
_EOF = object()

Publish = Callable[[BaseModel], None]
# A pinned code bundle -> its unpacked directory (scraper.code.CodeCache.path).
CodeSource = Callable[[CodeRef], "os.PathLike[str] | str"]


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        return prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # loaded in the parent: nothing to look up after fork()
_warm: WarmChildren | None = None  # this process's fork server, if started


def start_warm_children() -> WarmChildren:
    """Start this process's fork server (scraper/forkserver.py); crawls fork from it.

    Call it from a thread that lives as long as the process (the server gets
    PR_SET_PDEATHSIG like a crawl child).
    """
    global _warm
    if _warm is None:
        _warm = WarmChildren.start(
            [sys.executable, "-m", "scraper.forkserver"],
            env=_child_env(),
            preexec_fn=_child_setup(os.getpid()),
        )
    return _warm


def stop_warm_children() -> None:
    global _warm
    if _warm is not None:
        _warm.stop()
        _warm = None


def _child_setup(parent_pid: int) -> Callable[[], None] | None:
    """preexec_fn: the child gets SIGKILL when the thread that spawned it dies.

    PR_SET_PDEATHSIG follows the spawning *thread*: call run_job from a thread
    that outlives the crawl (a Celery prefork task or the main thread does).
    """
    prctl = _prctl
    if prctl is None:
        return None

    def setup() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(70)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(70)

    return setup


def _child_env(code_path: str | None = None, egress: ChildEgress | None = None) -> dict[str, str]:
    """The environment of the child: ours, plus this checkout on PYTHONPATH.

    The egress exits travel here, not in the Job: proxy URLs hold credentials.
    """
    env = dict(os.environ)
    env.pop(CODE_PATH_ENV, None)
    env.pop(CODE_TOKEN_ENV, None)  # the crawl (user code) has no use for the code token
    if code_path is not None:
        env[CODE_PATH_ENV] = code_path
    root = os.path.dirname(os.path.dirname(os.path.abspath(scraper.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop(EGRESS_ENV, None)
    if egress is not None:
        env[EGRESS_ENV] = egress.model_dump_json()
    return env


def spawn_child(
    code_path: str | None = None, egress: ChildEgress | None = None
) -> subprocess.Popen[bytes] | WarmChild:
    """A crawl child in its own process group, tied to our life.

    A fork of the warm fork server when this process started one
    (`start_warm_children`) and the crawl needs nothing in its environment (a
    fork inherits the server's): no code bundle, no proxy exits, no verified
    exit address. Else a fresh `python -m scraper.child` with them.
    """
    private = code_path is not None or (
        egress is not None and any(e.proxy or e.address for e in egress.exits)
    )
    if _warm is not None and not private:
        try:
            return _warm.spawn()
        except OSError as exc:  # the server died: crawl anyway, the slow way
            log.warning("warm crawl processes unavailable (%s): starting a fresh one", exc)
    return subprocess.Popen(
        [sys.executable, "-m", CHILD_MODULE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(code_path, egress),
        process_group=0,
        preexec_fn=_child_setup(os.getpid()),
        close_fds=True,
    )


def _pump_lines(stream: IO[bytes], out: queue.Queue[object], stop: threading.Event) -> None:
    """Protocol lines into `out`. The queue is bounded: a child that outruns
    `publish` blocks on its pipe instead of filling the worker's memory."""

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for line in iter(stream.readline, b""):
            if not put(line):
                return
    except (OSError, ValueError):  # the stream was closed under us
        pass
    put(_EOF)


def _pump_stderr(stream: IO[bytes], tail: collections.deque[str]) -> None:
    for raw in iter(lambda: stream.readline(STDERR_LINE_MAX), b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        tail.append(line)
        log.debug("child: %s", line)


def _kill(proc: subprocess.Popen[bytes] | WarmChild) -> None:
    """SIGKILL the child's process group (only ours: it was started as its leader)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def _death_message(returncode: int | None, tail: collections.deque[str]) -> str:
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    text = "\n".join(tail).strip()
    message = f"crawl process died without finishing ({how})"
    if text:
        message += ":\n" + text
    if len(message) > ERROR_MAX_CHARS:
        message = message[:200] + "\n...\n" + message[-(ERROR_MAX_CHARS - 210) :]
    return message


def run_job(
    job: Job,
    publish: Publish,
    *,
    worker: str,
    batch_items: int = 100,
    batch_seconds: float = 1.0,
    progress_seconds: float = 1.0,
    timeout: float | None = None,
    on_started: Callable[[], None] | None = None,
    code: CodeSource | None = None,
    egress: ChildEgress | None = None,
    attestation: EgressAttestation | None = None,
    should_abort: Callable[[], bool] | None = None,
    participant: bool = False,
) -> RunFinished:
    """Run one job in a crawl child, publishing its messages; returns the RunFinished.

    `batch_items` caps the entries (items + fetches) of one ItemBatch;
    `batch_seconds` caps how long an entry waits; a RunProgress goes out every
    `progress_seconds`. `timeout` (seconds) kills a crawl that runs longer;
    by default the site's limits.max_duration plus DURATION_GRACE_SECONDS, so
    a crawl that ignores its own limit (a hung spider) still ends. An
    exception from `publish` kills the child and propagates. `on_started` is
    called once RunStarted is published, before the crawl process starts (the
    worker acks the job there: from then on the run's lease covers it).
    `code` provides the directory of the code bundle a job pins (`Job.code`);
    a bundle it cannot provide (CodeError) fails the run before any crawl.
    `egress`: the exits the crawl goes out through (scraper.egress), given to
    the child privately; `attestation`: what RunStarted records about them.
    `should_abort` is polled a few times a second: once true, the crawl is
    killed, the items so far are published and CrawlAborted is raised
    instead of a RunFinished (the worker hands the job back).

    A `distributed` site's job runs as the run's owner, or with `participant`
    as a helper that publishes only ItemBatches and reports its stats to the
    owner through Redis; its RunFinished is returned, not published
    (scraper/distributed.py).
    """
    clock = time.monotonic
    if timeout is None:
        timeout = job.config.limits.max_duration + DURATION_GRACE_SECONDS
    board = RunBoard(job, worker) if is_distributed(job) else None
    if participant:
        if board is None:
            raise ValueError(f"run {job.run_id} is not distributed: nothing to take part in")
        board.join()
    else:
        publish(
            RunStarted(
                run_id=job.run_id,
                site=job.site,
                region=job.region,
                worker=worker,
                started_at=utcnow(),
                attempt=job.attempt,
                egress=attestation,
            )
        )
        if board is not None:
            board.open()
    if on_started is not None:
        on_started()
    code_path: str | None = None
    if job.code is not None:
        try:
            if code is None:
                raise CodeError(f"run needs code bundle {job.code.version}: no code source here")
            code_path = os.fspath(code(job.code))
        except CodeError as exc:
            log.error("run %s: %s", job.run_id, exc)
            return _finish(job, publish, "failed", RunStats(), str(exc))
    stats = StatsTracker()
    batcher = Batcher(
        job.run_id, job.site, job.region, max_entries=batch_items, max_seconds=batch_seconds
    )
    done: Done | None = None
    timed_out = aborted = False
    events: queue.Queue[object] = queue.Queue(maxsize=EVENT_QUEUE_MAX)
    stop_reading = threading.Event()
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    # Distributed runs: pages the child released, acked once their items are out.
    releases: list[str] = []

    def ack_releases() -> None:
        if releases and board is not None:
            board.release(releases)
        releases.clear()

    def send(batch: BaseModel) -> None:
        publish(batch)
        ack_releases()

    def conclude(returncode: int | None) -> RunFinished:
        """The rest of the results out, then the RunFinished (CrawlAborted if aborted)."""
        if (batch := batcher.flush()) is not None:
            send(batch)
        ack_releases()
        if aborted:
            if board is not None and not participant and board.cancelled():
                # Cancelled, not handed back: nobody may join or continue the run.
                board.close()
                board.cleanup()
            snapshot = stats.snapshot()
            raise CrawlAborted(job.run_id, snapshot.pages, snapshot.items, snapshot)
        status: str
        final_stats: RunStats
        if done is not None:
            status, error, final_stats = done.status, done.error, done.stats
        else:
            status, final_stats = "failed", stats.snapshot()
            if timed_out:
                error = f"crawl timed out after {timeout}s"
            else:
                error = _death_message(returncode, tail)
        if board is not None and participant:
            board.report(final_stats)
            if board.cancelled():
                # The owner closed the run because it was cancelled, and our crawl saw
                # the close before our own cancel check did: we left a cancelled run.
                raise CrawlAborted(job.run_id, final_stats.pages, final_stats.items, final_stats)
        elif board is not None:
            board.close()
            final_stats = board.total(final_stats)
            board.cleanup()
            if done is not None and final_stats.pages > 0:
                status = "succeeded"  # the pages may all have gone to other workers
        return _finish(job, publish, status, final_stats, error, publish_it=not participant)

    proc = spawn_child(code_path, egress)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump_lines, args=(proc.stdout, events, stop_reading), daemon=True),
        threading.Thread(target=_pump_stderr, args=(proc.stderr, tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        try:
            proc.stdin.write(job.model_dump_json().encode())
            proc.stdin.close()
        except BrokenPipeError:
            log.warning("crawl child of run %s exited before reading its job", job.run_id)

        next_progress = clock() + progress_seconds
        give_up_at: float | None = clock() + timeout if timeout is not None else None
        last_line = clock()
        while True:
            if should_abort is not None and done is None and should_abort():
                aborted = True
                _kill(proc)
                break
            wake = min(t for t in (batcher.deadline(), next_progress, give_up_at) if t is not None)
            if should_abort is not None:
                wake = min(wake, clock() + ABORT_POLL_SECONDS)
            if releases:
                wake = min(wake, last_line + RELEASE_IDLE_SECONDS)
            try:
                line = events.get(timeout=max(0.0, wake - clock()))
            except queue.Empty:
                line = None
            if line is _EOF:
                break
            if isinstance(line, bytes):
                last_line = clock()
                done = _handle(line, batcher, stats, send, done, job.run_id, releases) or done
            quiet = bool(releases) and clock() - last_line >= RELEASE_IDLE_SECONDS
            if (batch := batcher.flush() if quiet else batcher.poll()) is not None:
                send(batch)
            if releases and not len(batcher):  # all they wrote before is out
                ack_releases()
            now = clock()
            if now >= next_progress:
                if not participant:
                    publish(
                        RunProgress(
                            run_id=job.run_id,
                            site=job.site,
                            region=job.region,
                            stats=stats.snapshot(),
                            sent_at=utcnow(),
                        )
                    )
                if board is not None:
                    board.alive()
                next_progress = now + progress_seconds
            if give_up_at is not None and now >= give_up_at and done is None:
                log.warning("run %s timed out after %ss: killing the crawl", job.run_id, timeout)
                timed_out = True
                give_up_at = None
                _kill(proc)
        finished: RunFinished | None = None
        if done is not None:
            # The crawl said how it ended and closed its stream: its results go out
            # now, not after the fork server reaped it (a few ms on every job).
            finished = conclude(None)
        returncode: int | None
        try:
            returncode = proc.wait(timeout=0 if aborted else EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("crawl child of run %s did not exit after its last event", job.run_id)
            _kill(proc)
            returncode = proc.returncode
    finally:
        stop_reading.set()
        _kill(proc)
        for reader, stream in zip(readers, (proc.stdout, proc.stderr), strict=True):
            reader.join(timeout=5)
            if not reader.is_alive():  # closing under a blocked readline() could hang
                stream.close()

    return finished if finished is not None else conclude(returncode)


def _finish(
    job: Job,
    publish: Publish,
    status: str,
    stats: RunStats,
    error: str | None,
    *,
    publish_it: bool = True,
) -> RunFinished:
    """The run's RunFinished, published unless a distributed run's helper
    (its owner reports the run's whole stats)."""
    finished = RunFinished(
        run_id=job.run_id,
        site=job.site,
        region=job.region,
        status="succeeded" if status == "succeeded" else "failed",
        finished_at=utcnow(),
        stats=stats,
        error=error,
    )
    if publish_it:
        publish(finished)
    return finished


def _handle(
    line: bytes,
    batcher: Batcher,
    stats: StatsTracker,
    publish: Publish,
    done: Done | None,
    run_id: str,
    releases: list[str],
) -> Done | None:
    """Apply one protocol line; returns the Done event when this line is it.

    A Release is queued in `releases`, acked once everything the child wrote
    before it is published.
    """
    try:
        event = decode_event(line)
    except ProtocolError as exc:
        log.warning("run %s: %s", run_id, exc)
        return None
    if done is not None:
        log.warning("run %s: event after 'done' ignored", run_id)
        return None
    batch = None
    if isinstance(event, ScrapedItem):
        stats.add_item(event)
        batch = batcher.add_item(event)
    elif isinstance(event, Fetch):
        stats.add_fetch(event)
        batch = batcher.add_fetch(event)
    elif isinstance(event, Release):
        releases.append(event.entry)
    else:
        return event
    if batch is not None:
        publish(batch)
    return None
