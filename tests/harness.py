"""Real geoscrape processes for end-to-end tests: start, watch, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 60, interval: float = 0.2, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Stack:
    """Environment and processes of one test's geoscrape deployment."""

    workdir: Path
    broker_url: str
    db_url: str
    config: Path
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GEOSCRAPE_BROKER_URL": self.broker_url,
            "GEOSCRAPE_DATABASE_URL": self.db_url,
            "GEOSCRAPE_CONFIG": str(self.config),
            "PYTHONUNBUFFERED": "1",
        }

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `geoscrape ARGS` to completion."""
        return subprocess.run(
            [sys.executable, "-m", "geoscrape.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `geoscrape ARGS` in the background, its output in WORKDIR/NAME.log."""
        log = self.workdir / f"{name}.log"
        with log.open("ab") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "geoscrape.cli", *args],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[name] = (proc, log)
        return proc

    def worker(self, region: str, name: str | None = None) -> subprocess.Popen[bytes]:
        return self.start(name or f"worker-{region}", "worker", "--region", region)

    def ingest(self) -> subprocess.Popen[bytes]:
        return self.start("ingest", "ingest")

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def stop(self, *names: str) -> None:
        """SIGTERM the named processes at once (graceful), then reap them."""
        procs = [self.procs[n][0] for n in names]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        self.stop(*self.procs)

    def logs(self) -> str:
        return "\n".join(f"----- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def sessions(self) -> Any:
        from storage.db import make_engine, session_factory

        return session_factory(make_engine(self.db_url))


@contextmanager
def stack(workdir: Path, broker_url: str, db_url: str, config_text: str) -> Iterator[Stack]:
    """A deployment whose processes are always stopped, with logs shown on failure."""
    config = workdir / "sites.yaml"
    config.write_text(config_text)
    s = Stack(workdir=workdir, broker_url=broker_url, db_url=db_url, config=config)
    try:
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.stop_all()
