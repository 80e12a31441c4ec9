"""Warm crawl processes: a fork server with the crawl code already imported.

Starting `python -m scraper.child` costs an interpreter and the imports of
requests, parsel, Scrapy and Twisted for every crawl (most of a one-page
job). The worker instead starts one fork server (`python -m scraper.forkserver
SOCKET`) that imports all of that once and then waits. For each crawl the
runner connects to its Unix socket and passes the three pipe ends of the
crawl (stdin, protocol stdout, stderr) with SCM_RIGHTS; the server forks, and
the fork runs `scraper.child.main()` on them and exits. The server answers
the fork's pid, and its exit code when it ends, on the same connection.

Isolation is unchanged: every crawl is a fresh process, forked from a server
that never ran a crawl nor started a reactor, that exits after its one crawl
(so nothing leaks into the next one). Lifetimes stay tied: the server dies
with the worker (PR_SET_PDEATHSIG), a fork dies with the server, and each
fork leads its own process group, which the runner kills as before.

The server is single-threaded (forking from a threaded process is unsafe):
one selector loop over the listening socket and a SIGCHLD wake-up pipe.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys

READY = b"ready\n"


def preload() -> None:
    """Everything a crawl imports, imported once in the server (no reactor is installed),
    and the caches every crawl would otherwise fill itself (a one-page crawl spent
    most of its time on them)."""
    import netrc  # noqa: F401  (requests imports it on the first request)

    import scraper.child
    import scraper.ratelimit
    import scraper.requests_engine
    import scraper.runner  # the fork takes _prctl from it
    import scraper.scrapy_engine
    import scraper.scrapy_frontier
    from regions.settings import settings
    from scraper import blocks

    scraper.ratelimit._extractor()  # the public suffix list, parsed once
    blocks.warm()  # the built-in block signatures, parsed and compiled
    # A fork inherits the server's environment, so the settings parsed here are its own.
    # Bad settings are left for the crawl to report, as a fresh child would.
    with contextlib.suppress(Exception):
        settings()


def _run_fork(fds: list[int], server_pid: int) -> int:
    """In the fork: become the crawl child on the passed pipes."""
    os.setpgid(0, 0)  # its own group, so the runner can kill the crawl and its children
    from scraper.runner import _prctl

    if _prctl is not None:
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the server
    if os.getppid() != server_pid:
        return 70
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    from scraper import child

    return child.main()


def serve(path: str) -> None:
    preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    forks: dict[int, socket.socket] = {}
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    me = os.getpid()
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                conn, _ = server.accept()
                try:
                    _, fds, _, _ = socket.recv_fds(conn, 16, 3)
                except OSError:
                    conn.close()
                    continue
                if len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:  # the crawl: drop everything of the server's
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for other in (server, conn, *forks.values()):
                        other.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    code = 70
                    try:
                        code = _run_fork(fds, me)
                    finally:
                        with contextlib.suppress(Exception):
                            sys.stdout.flush()
                            sys.stderr.flush()
                        os._exit(code)
                for fd in fds:
                    os.close(fd)
                forks[pid] = conn
                with contextlib.suppress(OSError):
                    conn.sendall(f"{pid}\n".encode())
            else:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
                _reap(forks)


def _reap(forks: dict[int, socket.socket]) -> None:
    while forks:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = forks.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
