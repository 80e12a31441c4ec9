"""How a regional worker stops when told (SIGINT, SIGTERM, Ctrl-C).

- The first signal: Celery stops taking jobs (warm shutdown); the worker logs
  what it is finishing (site, run, pages so far) and lets the crawl end.
- A second signal, or `--stop-timeout` seconds (default 30) after the first:
  every crawl in progress is aborted (its child killed, the items so far
  published), its run handed back with a `RunReleased` (ingest requeues the
  job to the region's queue: same run id, nothing lost, nothing doubled),
  and the worker exits.

Celery's own handlers cannot do this: its "cold" second Ctrl-C waits for the
threads pool's tasks, i.e. for the crawl to end. So once the worker is ready
(`worker_ready`, in the main thread) StopControl takes SIGINT and SIGTERM
over: the first sets Celery's warm-shutdown flag, the second sets `abort`,
which the crawl runner polls. The handler only counts and sets flags; a plain
thread does the logging and the timing.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from celery.signals import worker_ready

from regions.messages import Job

log = logging.getLogger("geoscrape.worker")

DEFAULT_STOP_TIMEOUT = 30.0


@dataclass
class Crawl:
    job: Job
    pages: int = 0


class StopControl:
    """Counts stop signals; `abort` is set on the second one or after `stop_timeout`."""

    def __init__(self, stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        self.stop_timeout = stop_timeout
        self.signals = 0
        self.stopping = threading.Event()
        self.abort = threading.Event()
        self._crawls: dict[str, Crawl] = {}
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="stop-watch", daemon=True)
        self._watcher.start()

    # -- crawls in progress -------------------------------------------------

    def started(self, job: Job) -> None:
        with self._lock:
            self._crawls[job.run_id] = Crawl(job)

    def progress(self, run_id: str, pages: int) -> None:
        with self._lock:
            if run_id in self._crawls:
                self._crawls[run_id].pages = pages

    def finished(self, run_id: str) -> None:
        with self._lock:
            self._crawls.pop(run_id, None)

    def describe(self) -> str:
        with self._lock:
            crawls = list(self._crawls.values())
        if not crawls:
            return "no crawl in progress"
        return "; ".join(
            f"site {c.job.site!r} run {c.job.run_id} ({c.pages} pages so far)" for c in crawls
        )

    # -- signals --------------------------------------------------------------

    def signalled(self, signum: int, _frame: Any) -> None:
        """The SIGINT/SIGTERM handler: first a warm shutdown, then abort."""
        from celery.worker import state

        self.signals += 1
        if self.signals == 1:
            state.should_stop = 0  # Celery's warm shutdown: take no new job, finish
        else:
            self.abort.set()
        self.stopping.set()

    def _take_signals(self, **_: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("worker ready outside the main thread: Celery keeps its signal handlers")
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.signalled)

    def connect(self) -> StopControl:
        worker_ready.connect(self._take_signals, weak=False)
        return self

    def disconnect(self) -> None:
        worker_ready.disconnect(self._take_signals)

    def _watch(self) -> None:
        self.stopping.wait()
        if self.abort.is_set():
            log.warning("stopping now: aborting and handing back %s", self.describe())
            return
        log.warning(
            "stopping: no new jobs; finishing %s (signal again, or %gs, to hand it back)",
            self.describe(),
            self.stop_timeout,
        )
        if not self.abort.wait(self.stop_timeout):
            log.warning(
                "stop timeout (%gs): aborting and handing back %s",
                self.stop_timeout,
                self.describe(),
            )
            self.abort.set()
        else:
            log.warning("second stop signal: aborting and handing back %s", self.describe())
