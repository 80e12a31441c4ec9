"""Worker heartbeats: a regional worker tells the centre it is alive, over ingest.

Every HEARTBEAT_INTERVAL seconds the worker publishes a WorkerHeartbeat (name,
region, host, pid, egress address) to the `ingest` exchange, the only one it
may write to, and one more with ``stopping=True`` when it shuts down. Ingest
upserts the `workers` table; `geoscrape status` counts a worker as live while
its last heartbeat is younger than LIVE_WITHIN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from regions.bus import connect, publish_ingest
from regions.messages import ExitReport, WorkerHeartbeat, dump, utcnow

log = logging.getLogger("geoscrape.heartbeat")

HEARTBEAT_INTERVAL = 10.0
# Three missed heartbeats and a worker no longer counts as live.
LIVE_WITHIN = timedelta(seconds=3 * HEARTBEAT_INTERVAL)
AMQP_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "pyamqps": 5671}


def worker_name(region: str, host: str | None = None, pid: int | None = None) -> str:
    return f"{region}@{host or socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def egress_address(url: str) -> str | None:
    """The local address of this machine's route to the broker in `url`.

    A connected UDP socket makes the kernel pick the route and source address
    without sending a packet. None if the broker's name does not resolve.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or AMQP_PORTS.get(parts.scheme, 5672)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError:
        return None


class Heartbeat:
    """Publishes this worker's heartbeats from a daemon thread until stop()."""

    def __init__(
        self,
        url: str,
        region: str,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        exits: Callable[[], list[ExitReport] | None] | None = None,
        egress: str | None = None,
    ) -> None:
        """`egress`: the region's source address, when set (else the route to the broker)."""
        self.url = url
        self.exits = exits  # the egress exits' verification state (scraper/verify.py)
        self.egress = egress
        self.region = region
        self.interval = interval
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = worker_name(region, self.host, self.pid)
        self.started_at: datetime = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._lock = threading.Lock()  # one publisher on the connection at a time
        self._conn = connect(url)

    def message(self, *, stopping: bool = False) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            name=self.name,
            region=self.region,
            host=self.host,
            pid=self.pid,
            egress=self.egress or egress_address(self.url),
            exits=self.exits() if self.exits is not None else None,
            started_at=self.started_at,
            sent_at=utcnow(),
            stopping=stopping,
        )

    def beat(self, *, stopping: bool = False) -> bool:
        """Publish one heartbeat; False (logged) if the broker is unreachable."""
        with self._lock:
            try:
                publish_ingest(self._conn, dump(self.message(stopping=stopping)))
                return True
            except Exception as exc:  # a missed heartbeat must never stop the worker
                log.warning("heartbeat not sent: %s", exc)
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = connect(self.url)
                return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and say so: the centre then shows this worker as stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        self.beat(stopping=True)
        with contextlib.suppress(Exception):
            self._conn.close()
