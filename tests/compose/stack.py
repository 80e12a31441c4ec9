"""docker-compose projects on the private engine, and waiting on conditions."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tests.compose.engine import DockerEngine

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class ComposeError(AssertionError):
    """A docker-compose or docker command failed (the message has its output)."""


class Compose:
    """One compose project: `docker-compose -p NAME -f ... ARGS` with the test's variables."""

    def __init__(
        self,
        engine: DockerEngine,
        project: str,
        files: list[str],
        env: dict[str, str],
        env_file: Path | None = None,
    ) -> None:
        self.engine = engine
        self.project = project
        self.files = files
        self.env = {**engine.env, **env}
        self.env_file = env_file

    def run(self, *args: str, input: str | None = None, timeout: float = 300) -> str:
        argv = ["docker-compose", "--ansi", "never", "-p", self.project]
        for path in self.files:
            argv += ["-f", path]
        if self.env_file is not None:
            argv += ["--env-file", str(self.env_file)]
        try:
            done = subprocess.run(
                [*argv, *args], cwd=ROOT, env=self.env, input=input,
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            what = f"docker-compose {' '.join(args)}"
            raise ComposeError(f"{what}: no exit in {timeout:.0f}s") from exc
        if done.returncode != 0:
            raise ComposeError(
                f"docker-compose {' '.join(args)}: exit {done.returncode}\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def containers(self, service: str) -> list[str]:
        """Names of the service's containers (running or not), in number order."""
        ids = self.run("ps", "-a", "-q", service).split()
        names = [self.engine.docker("inspect", "-f", "{{.Name}}", i).strip("/\n") for i in ids]
        return sorted(names)

    def states(self) -> dict[str, str]:
        """container name -> `running`, `running (healthy)`, `exited (0)`, ..."""
        ids = self.run("ps", "-a", "-q").split()
        if not ids:
            return {}
        fmt = (
            "{{.Name}} {{.State.Status}}{{if .State.Health}} ({{.State.Health.Status}}){{end}}"
            '{{if eq .State.Status "exited"}} ({{.State.ExitCode}}){{end}}'
        )
        lines = self.engine.docker("inspect", "-f", fmt, *ids).splitlines()
        return dict(line.strip("/").split(" ", 1) for line in lines if line)

    def diagnostics(self) -> str:
        """`ps` and the tail of every service's log, for a failure report."""
        parts = []
        for args in (("ps", "-a"), ("logs", "--no-color", "--tail=40")):
            try:
                parts.append(self.run(*args, timeout=120))
            except ComposeError as exc:
                parts.append(str(exc))
        return f"== compose project {self.project}\n" + "\n".join(parts)

    def down(self) -> None:
        """Kill (no graceful stop: nothing is kept), then remove containers, volumes, networks."""
        self.run("kill", timeout=120)
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "1", timeout=300)


def wait_for(what: str, check: Callable[[], T | None], deadline: float, interval: float = 1) -> T:
    """The first truthy `check()`, polled until `deadline` seconds pass; else fail naming `what`."""
    until = time.monotonic() + deadline
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (ComposeError, OSError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > until:
            raise AssertionError(f"gave up after {deadline:.0f}s waiting for {what} ({last})")
        time.sleep(interval)


class Phases:
    """Wall time per phase of the test, reported at the end."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.durations: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.report(f"-> {name}")
        try:
            yield
        finally:
            self.durations[name] = time.monotonic() - started
            self.report(f"<- {name}: {self.durations[name]:.0f} s")

    def summary(self) -> str:
        total = sum(self.durations.values())
        rows = [f"  {name:<48} {seconds:6.0f} s" for name, seconds in self.durations.items()]
        return "\n".join(["phases:", *rows, f"  {'total':<48} {total:6.0f} s"])
