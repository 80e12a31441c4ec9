"""The runner's side of the fork server (scraper/forkserver.py).

`WarmChildren` starts and stops the server; `WarmChild` is one forked crawl,
with the part of `subprocess.Popen` the runner uses (pid, the three pipes,
poll, wait, kill, returncode), so the runner treats both kinds alike.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import IO

from scraper.errors import ScraperError


class WarmChildError(ScraperError):
    """The fork server did not start."""


class WarmChild:
    """One crawl forked by the fork server."""

    def __init__(self, path: str) -> None:
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr as (read, write)
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(path)
            socket.send_fds(self._conn, [b"crawl"], theirs)
            self._buffer = b""
            line = self._line(None)
            if not line or not line.strip():
                raise ConnectionError("the fork server closed the connection")
            self.pid = int(line)
        except BaseException:
            for read, write in pipes:
                os.close(read)
                os.close(write)
            self._conn.close()
            raise
        for fd in theirs:
            os.close(fd)
        self.stdin: IO[bytes] | None = os.fdopen(pipes[0][1], "wb")
        self.stdout: IO[bytes] | None = os.fdopen(pipes[1][0], "rb")
        self.stderr: IO[bytes] | None = os.fdopen(pipes[2][0], "rb")
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line; b"" once it closed, None if none came within `timeout`.

        Not a file from makefile(): with a timeout of 0 its readline() answers
        b"" when no data is there yet, which looks like the end of the stream.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], wait)[0]:
                return None
            try:
                data = self._conn.recv(64)
            except OSError:
                data = b""
            if not data:
                return b""
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _read_exit(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        line = self._line(timeout)
        if line is None:
            return None
        # No line: the server died and took the fork with it (PR_SET_PDEATHSIG).
        self.returncode = int(line) if line.strip() else -signal.SIGKILL
        self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_exit(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read_exit(timeout)
        if code is None:
            raise subprocess.TimeoutExpired("crawl", timeout or 0)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class WarmChildren:
    """A running fork server and the socket to reach it."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: str) -> None:
        self.proc = proc
        self.workdir = workdir
        self.path = os.path.join(workdir, "fork.sock")

    @classmethod
    def start(
        cls, argv: list[str], *, env: dict[str, str], preexec_fn: Callable[[], None] | None
    ) -> WarmChildren:
        workdir = tempfile.mkdtemp(prefix="geoscrape-fork-")
        proc = subprocess.Popen(
            [*argv, os.path.join(workdir, "fork.sock")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
            preexec_fn=preexec_fn,
            close_fds=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready" once it imported everything, b"" if it died
        if line != b"ready\n":
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
            raise WarmChildError(f"the fork server did not start (exit {proc.returncode})")
        proc.stdout.close()
        return cls(proc, workdir)

    def spawn(self) -> WarmChild:
        if self.proc.poll() is not None:
            raise ConnectionError(f"the fork server exited ({self.proc.returncode})")
        return WarmChild(self.path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
