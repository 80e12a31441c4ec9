"""The SSRF guard (scraper.ssrf): unit rules, and real crawls that must refuse.

The crawl tests run inside a throwaway network namespace (`unshare --net
--mount`) that has nothing but its own loopback, and a private /etc/hosts
bind-mounted in its own mount namespace. So even a broken guard could only
reach a loopback listener or fail with "network unreachable": no packet can
leave for 169.254.169.254 or a private network. The listener on the second
loopback port records every hit; the tests assert it got none.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from scheduler.config import Config
from scraper.ssrf import REFUSED, Guard, SSRFRefused

ROOT = Path(__file__).resolve().parent.parent

# -- the rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_private_addresses_are_refused_by_default(address: str) -> None:
    assert Guard().address_allowed(address, 80) is False
    with pytest.raises(SSRFRefused, match=f"^{REFUSED}: "):
        Guard().check_address(address, 80)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert Guard().address_allowed(address, 443) is True


@pytest.mark.parametrize(
    "url, reason",
    [
        ("file:///etc/passwd", "scheme file: is not http(s)"),
        ("data:text/html,<h1>x</h1>", "scheme data: is not http(s)"),
        ("ftp://example.com/x", "scheme ftp: is not http(s)"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254:80 is a private"),
        ("http://[::1]:8080/", "::1:8080 is a private"),
        ("https://10.0.0.5/", "10.0.0.5:443 is a private"),
    ],
)
def test_check_url_names_the_reason(url: str, reason: str) -> None:
    with pytest.raises(SSRFRefused) as caught:
        Guard().check_url(url)
    assert str(caught.value).startswith(f"{REFUSED}: ")
    assert reason in str(caught.value)


def test_allow_hosts_with_and_without_a_port() -> None:
    guard = Guard.build(["127.0.0.1:8801", "LocalHost", "[::1]:9000"])
    guard.check_url("http://127.0.0.1:8801/x")
    guard.check_url("http://localhost:1234/")  # any port of a host listed without one
    guard.check_url("http://[::1]:9000/")
    for url in ("http://127.0.0.1:8802/", "http://127.0.0.2:8801/", "http://[::1]:9001/"):
        with pytest.raises(SSRFRefused):
            guard.check_url(url)


def test_allow_networks_let_only_that_network_through() -> None:
    guard = Guard.build(allow_networks=["10.20.0.0/16"])
    assert guard.address_allowed("10.20.3.4", 80)
    assert not guard.address_allowed("10.21.0.1", 80)
    assert not guard.address_allowed("169.254.169.254", 80)
    assert not guard.address_allowed("127.0.0.1", 80)


def test_site_allow_lists_add_to_the_defaults() -> None:
    config = Config.model_validate(
        {
            "regions": {"eu": None},
            "defaults": {"allow_hosts": ["127.0.0.1:8801"], "allow_networks": ["10.0.0.0/24"]},
            "sites": [
                {
                    "name": "a",
                    "regions": ["eu"],
                    "start_urls": ["http://127.0.0.1:8801/"],
                    "extract": {"fields": {"t": {"css": "title::text"}}},
                    "allow_hosts": ["127.0.0.1:8802"],
                    "allow_networks": ["10.0.0.0/24", "10.9.0.0/16"],
                }
            ],
        }
    )
    site = config.resolved_site("a")
    assert site.allow_hosts == ["127.0.0.1:8801", "127.0.0.1:8802"]
    assert site.allow_networks == ["10.0.0.0/24", "10.9.0.0/16"]


def test_requests_connections_are_checked_at_connect_time() -> None:
    """Even a URL that skipped check_url cannot connect: urllib3's factory is guarded."""
    from scraper.requests_engine import guarded_connections, short_error

    closed = _closed_port()  # if the guard failed, the connection would only be refused
    with guarded_connections(Guard()), pytest.raises(requests.ConnectionError) as caught:
        requests.get(f"http://127.0.0.1:{closed}/", timeout=5)
    assert short_error(caught.value) == (
        f"{REFUSED}: 127.0.0.1:{closed} is a private/loopback/link-local address"
    )


def test_the_twisted_resolver_drops_refused_addresses() -> None:
    from scraper.scrapy_engine import _GuardedReceiver

    class Receiver:
        def __init__(self) -> None:
            self.addresses: list[str] = []
            self.complete = False

        def resolutionBegan(self, resolution: Any) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            self.addresses.append(address.host)

        def resolutionComplete(self) -> None:
            self.complete = True

    class Addr:
        def __init__(self, host: str) -> None:
            self.host = host

    inner = Receiver()
    receiver = _GuardedReceiver(inner, Guard.build(["127.0.0.1:80"]), "rebind.test", 80)
    for host in ("93.184.216.34", "169.254.169.254", "10.0.0.1", "127.0.0.1"):
        receiver.addressResolved(Addr(host))
    receiver.resolutionComplete()
    assert inner.addresses == ["93.184.216.34", "127.0.0.1"] and inner.complete


# -- real crawls in a network namespace ------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str]
    pages: dict[str, tuple[int, dict[str, str], bytes]]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, headers, body = self.pages.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for key, value in {"Content-Type": "text/html", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _listener(host: str, pages: dict[str, Any]) -> Iterator[tuple[int, list[str]]]:
    hits: list[str] = []
    handler = type("H", (_Recorder,), {"hits": hits, "pages": pages})
    server_cls = type("S", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = (server_cls if ":" in host else ThreadingHTTPServer)((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1]), hits
    finally:
        server.shutdown()
        server.server_close()


def probe() -> None:
    """Runs inside the namespace: serve, crawl with both engines, print JSON results."""
    from regions.messages import ItemBatch, Job
    from scraper.runner import run_job

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with _listener("127.0.0.1", {}) as (port_b, hits_b), _listener("::1", {}) as (port_v6, hits_v6):
        targets = {
            "other_port": f"http://127.0.0.1:{port_b}/secret",
            "metadata": "http://169.254.169.254/latest/meta-data/",
            "by_name": f"http://sneaky.test:{port_b}/by-name",  # /etc/hosts: 127.0.0.2
            "v6": f"http://[::1]:{port_v6}/v6",
            "file": "file:///etc/passwd",
        }
        pages: dict[str, Any] = {
            "/to-private": (302, {"Location": "http://192.168.77.1/admin"}, b""),
            "/to-loopback": (302, {"Location": f"http://127.0.0.1:{port_b}/redirected"}, b""),
            "/ok": (200, {}, b"<html><h1 class=t>fine</h1></html>"),
        }
        with _listener("127.0.0.1", pages) as (port_a, hits_a):
            base = f"http://127.0.0.1:{port_a}"
            targets["to_private"] = f"{base}/to-private"
            targets["to_loopback"] = f"{base}/to-loopback"
            links = "".join(f"<a href='{url}'>{name}</a>" for name, url in targets.items())
            pages["/"] = (
                200,
                {},
                f"<html><body><a href='/ok'>ok</a>{links}</body></html>".encode(),
            )
            results: dict[str, Any] = {"targets": targets, "base": base}
            for engine in ("scrapy", "requests"):
                site: dict[str, Any] = {
                    "name": "guarded",
                    "regions": ["eu"],
                    "engine": engine,
                    "politeness": {"delay": 0, "robots": "ignore"},
                    "limits": {"timeout": "5s", "max_depth": 2},
                    "allow_hosts": [f"127.0.0.1:{port_a}"],
                    "extract": {"fields": {"t": {"css": "h1.t::text"}}},
                }
                if engine == "scrapy":
                    site["start_urls"] = [f"{base}/"]
                    site["follow"] = {"allow": [".*"]}
                else:
                    site["start_urls"] = [f"{base}/ok", *targets.values(), "data:text/html,hi"]
                config = Config.model_validate({"regions": {"eu": None}, "sites": [site]})
                job = Job(
                    run_id=uuid.uuid4().hex,
                    site="guarded",
                    region="eu",
                    config=config.resolved_site("guarded").model_dump(mode="json"),
                )
                messages: list[Any] = []
                finished = run_job(job, messages.append, worker="netns")
                results[engine] = {
                    "status": finished.status,
                    "fetches": [
                        f.model_dump()
                        for m in messages
                        if isinstance(m, ItemBatch)
                        for f in m.fetches
                    ],
                }
            results["hits_a"], results["hits_b"], results["hits_v6"] = hits_a, hits_b, hits_v6
    print("RESULT " + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def netns_crawls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the SSRF crawl tests need root and unshare(1) to create a network namespace")
    hosts = tmp_path_factory.mktemp("ssrf") / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n127.0.0.2 sneaky.test\n")
    script = (
        f"mount --bind {hosts} /etc/hosts && "
        f"exec {sys.executable} -c 'from tests.test_ssrf import probe; probe()'"
    )
    done = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _errors(result: dict[str, Any], engine: str) -> dict[str, str | None]:
    return {f["url"]: f["error"] for f in result[engine]["fetches"]}


def test_nothing_behind_the_guard_was_contacted(netns_crawls: dict[str, Any]) -> None:
    assert netns_crawls["hits_b"] == []
    assert netns_crawls["hits_v6"] == []
    # The allowed port served the crawl (robots ignored): both engines got /ok.
    assert netns_crawls["hits_a"].count("/ok") == 2


@pytest.mark.parametrize("engine", ["scrapy", "requests"])
@pytest.mark.parametrize(
    "target, reason",
    [
        ("other_port", "127.0.0.1:{port_b} is a private/loopback/link-local address"),
        ("metadata", "169.254.169.254:80 is a private/loopback/link-local address"),
        ("by_name", "sneaky.test (127.0.0.2):{port_b} is a private/loopback/link-local address"),
        ("v6", "::1:{port_v6} is a private/loopback/link-local address"),
        ("file", "scheme file: is not http(s)"),
        ("to_private", "192.168.77.1:80 is a private/loopback/link-local address"),
        ("to_loopback", "127.0.0.1:{port_b} is a private/loopback/link-local address"),
    ],
)
def test_each_refusal_is_recorded_as_a_fetch_error(
    netns_crawls: dict[str, Any], engine: str, target: str, reason: str
) -> None:
    targets = netns_crawls["targets"]
    port_b = targets["other_port"].split(":")[2].split("/")[0]
    port_v6 = targets["v6"].rsplit(":", 1)[1].split("/")[0]
    expected = f"{REFUSED}: " + reason.format(port_b=port_b, port_v6=port_v6)
    assert _errors(netns_crawls, engine)[targets[target]] == expected
    assert netns_crawls[engine]["status"] == "succeeded"  # /ok was fetched


def test_data_urls_are_refused(netns_crawls: dict[str, Any]) -> None:
    assert _errors(netns_crawls, "requests")["data:text/html,hi"] == (
        f"{REFUSED}: scheme data: is not http(s)"
    )
