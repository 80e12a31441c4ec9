"""Private, killable RabbitMQ and PostgreSQL instances for the fault-injection suite.

The machine's shared RabbitMQ and PostgreSQL serve other people's tests, so
the faults are injected into throwaway instances started here: a second
RabbitMQ node (its own node name, ports, data and config) and a PostgreSQL
cluster (initdb in a temp folder, its own port). Each is stopped and removed at
the end of the session, also on failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

RABBIT_BIN = "/usr/lib/rabbitmq/bin"
RABBIT_HOME = "/var/lib/rabbitmq"  # where the server's and CLI's Erlang cookie lives


class ServiceError(RuntimeError):
    """A private test service that cannot be started (the message says why)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(
    args: list[str], timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload,no-any-return]


class RabbitNode:
    """A RabbitMQ node of our own: `start()`, `stop()`, `restart()`, `url`."""

    def __init__(
        self, consumer_timeout_ms: int | None = None, timeout_check_ms: int | None = None
    ) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.name = f"gsfault-{self.id}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"gsfault-rabbit-{self.id}-"))
        conf = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "loopback_users = none"]
        if consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {consumer_timeout_ms}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        # How often each channel checks its deliveries against consumer_timeout
        # (rabbit's channel_tick_interval, 60 s by default; RabbitMQ's own tests
        # shorten it the same way).
        tick = "" if timeout_check_ms is None else f"{{channel_tick_interval, {timeout_check_ms}}}"
        (self.dir / "advanced.config").write_text(f"[{{rabbit, [{tick}]}}].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> list[str]:
        return [
            "env",
            f"HOME={RABBIT_HOME}",
            f"RABBITMQ_NODENAME={self.name}",
            f"RABBITMQ_NODE_PORT={self.port}",
            f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_MNESIA_BASE={self.dir}/mnesia",
            f"RABBITMQ_LOG_BASE={self.dir}/log",
            f"RABBITMQ_CONFIG_FILE={self.dir}/rabbitmq.conf",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={self.dir}/enabled_plugins",
            f"RABBITMQ_ADVANCED_CONFIG_FILE={self.dir}/advanced.config",
            f"RABBITMQ_PID_FILE={self.dir}/pid",
        ]

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl against this node only."""
        return _run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                *self._env(),
                f"{RABBIT_BIN}/rabbitmqctl",
                "-n",
                self.name,
                *args,
            ],
            timeout=timeout,
        )

    def start(self, timeout: float = 90) -> None:
        if shutil.which("runuser") is None or not os.path.exists(f"{RABBIT_BIN}/rabbitmq-server"):
            raise ServiceError(
                "the fault suite starts its own RabbitMQ node: it needs rabbitmq-server "
                f"(apt-get install rabbitmq-server, {RABBIT_BIN}) and runuser, as root"
            )
        started = _run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                *self._env(),
                f"{RABBIT_BIN}/rabbitmq-server",
                "-detached",
            ],
            cwd=RABBIT_HOME,
        )
        if started.returncode != 0:
            raise ServiceError(f"cannot start RabbitMQ node {self.name}: {started.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ctl("await_startup", "--timeout", "30").returncode == 0:
                return
            time.sleep(1)
        raise ServiceError(
            f"RabbitMQ node {self.name} did not start within {timeout}s; log: {self.log_tail()}"
        )

    def stop(self) -> None:
        self.ctl("stop", timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._listening():
            time.sleep(0.2)

    def restart(self) -> float:
        """Stop the whole node, start it again; returns how long the broker was away."""
        began = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - began

    def _listening(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def queue_counts(self, name: str) -> tuple[int, int]:
        """(ready, unacknowledged) messages of queue `name` in the default vhost."""
        done = self.ctl(
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == name:
                return int(parts[1]), int(parts[2])
        return 0, 0

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in glob.glob(f"{self.dir}/log/*.log"):
            text += Path(path).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PgCluster:
    """A PostgreSQL cluster of our own: `start()`, `stop()`, `url(db)`, `create_db()`."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise ServiceError(
                "the fault suite starts its own PostgreSQL cluster: it needs initdb/pg_ctl "
                "(apt-get install postgresql)"
            )
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gsfault-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"

    def _as_postgres(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(["runuser", "-u", "postgres", "--", *args], timeout=timeout)

    def init(self) -> None:
        done = self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        if done.returncode != 0:
            raise ServiceError(f"initdb failed: {done.stderr[-2000:]}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c full_page_writes=off"
        )
        done = self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        if done.returncode != 0:
            raise ServiceError(
                f"cannot start PostgreSQL on port {self.port}: {done.stdout}{done.stderr}"
                f"{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}"
            )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self) -> str:
        import psycopg

        name = f"faults_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
