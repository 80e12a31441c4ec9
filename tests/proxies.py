"""Real proxy servers, an IP echo service and geoip databases for the egress tests.

tinyproxy (HTTP, CONNECT for https) and dante (SOCKS5) from Debian run in the
foreground inside a region's network namespace; the test owns their processes
and stops them by PID. Both listen on the namespace's address, which the host
reaches over the region bridge (geoscrape/netns.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from geoscrape.netns import RegionHost
from tests.namespaces import in_namespace


@dataclass
class Proxy:
    kind: str  # "http" | "socks5"
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user and password else ""
        return f"{self.kind}://{auth}{self.host}:{self.port}"

    def stop(self) -> None:
        """Kill this proxy and its own children: the process group we started it as."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def requests_log(self) -> str:
        return self.log.read_text(errors="replace")


def _require(binary: str, package: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found is None:
        raise AssertionError(f"{binary} is missing: apt-get install {package}")
    return found


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"proxy on {host}:{port} not listening after 30s: {log.read_text()}")


def start_tinyproxy(
    host: RegionHost, workdir: Path, port: int, auth: tuple[str, str] | None = None
) -> Proxy:
    """tinyproxy inside `host`'s namespace, on its address (HTTP and CONNECT)."""
    binary = _require("tinyproxy", "tinyproxy")
    conf = workdir / f"tinyproxy-{host.region}.conf"
    log = workdir / f"tinyproxy-{host.region}.log"
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {port}",
        f"Listen {host.address}",
        "Timeout 30",
        "MaxClients 50",
        "LogLevel Connect",
        f'LogFile "{log}"',
        "DisableViaHeader Yes",
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    log.touch()
    log.chmod(0o666)
    proc = subprocess.Popen(
        in_namespace(host, binary, "-d", "-c", str(conf)),
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        stdin=subprocess.DEVNULL,
        process_group=0,  # `ip netns exec` execs the proxy: its PID leads the group
    )
    wait_listening(host.address, port, proc, log)
    return Proxy("http", host.address, port, proc, log)


def start_dante(host: RegionHost, workdir: Path, port: int) -> Proxy:
    """danted (SOCKS5, no authentication) inside `host`'s namespace."""
    binary = _require("danted", "dante-server")
    conf = workdir / f"danted-{host.region}.conf"
    log = workdir / f"danted-{host.region}.log"
    conf.write_text(
        f"logoutput: {log}\n"
        f"internal: {host.address} port = {port}\n"
        f"external: {host.address}\n"
        "clientmethod: none\n"
        "socksmethod: none\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "client pass {\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect error\n}\n"
        "socks pass {\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  command: connect\n"
        "  log: connect error\n}\n"
    )
    log.touch()
    proc = subprocess.Popen(
        in_namespace(host, binary, "-f", str(conf), "-N", "1"),
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        stdin=subprocess.DEVNULL,
        process_group=0,  # dante forks its workers: they go with the group
    )
    wait_listening(host.address, port, proc, log)
    return Proxy("socks5", host.address, port, proc, log)


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f'{{"ip": "{self.client_address[0]}"}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.seen.append(self.client_address[0])  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def echo_server(host: str) -> Iterator[tuple[str, list[str]]]:
    """An IP echo service answering JSON {"ip": caller}: (its URL, callers seen)."""
    server = ThreadingHTTPServer((host, 0), _Echo)
    server.seen = []  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/", server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def write_geoip(path: Path, countries: Mapping[str, str]) -> None:
    """A MaxMind DB (GeoLite2-Country layout) mapping each network to an ISO country.

    Written beside and renamed over `path`, so a worker never reads half a file.
    """
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    for network, code in countries.items():
        ipaddress.ip_network(network)  # a typo in a test must fail here
        writer.insert_network(IPSet([network]), {"country": {"iso_code": code}})
    tmp = path.with_suffix(".tmp")
    writer.to_db_file(str(tmp))
    tmp.replace(path)
