"""docker-compose.yml and deploy/region.compose.yml, brought up and crawled by a real Docker engine.

From nothing: a private dockerd (tests/compose/engine.py), offline base images
(deploy/offline/build.sh: mmdebstrap, then Python, RabbitMQ 3.10, Redis and
PostgreSQL 15 stand-ins), the project image from the Dockerfile, the central
stack (docker-compose.yml + deploy/tls.compose.yml + tests/compose/central.yml)
with the region users provisioned as docs/DEPLOY.md says, and a region in
another cloud (deploy/region.compose.yml + tests/compose/region.yml) that sees
only the broker's TLS port. One crawl, dispatched from the api container, runs
in every region while the eu worker doing it is killed; the tests then read
what happened. Everything is removed at the end, even on failure.

The steps, figures and phase times are written to the terminal (CI's log).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from geoscrape.testsite.geo import EXAMPLE_LOCALES, GeoCatalog, Locale
from tests.compose.engine import DockerEngine, mounts_under
from tests.compose.pki import make_pki
from tests.compose.stack import ROOT, Compose, ComposeError, Phases, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.compose, pytest.mark.timeout(1500)]

REGIONS = ["eu", "us", "asia", "sa"]
CENTRAL_REGIONS = ["eu", "us", "asia"]
SUBNETS = {"eu": "172.29.1.", "us": "172.29.2.", "asia": "172.29.3.", "sa": "172.29.100."}
PRODUCTS = 24  # sidecar.py geosite's default catalogue size
BROKER_NAME = "broker.central.test"  # the gateway's name on the wan network
PORTS = {  # host ports, inside this test's range, published on 127.0.0.1 only
    "RABBITMQ_PORT": "18172",
    "RABBITMQ_UI_PORT": "18173",
    "RABBITMQ_TLS_PORT": "18171",
    "API_PORT": "18180",
    "FLOWER_PORT": "18155",
}
IMAGES = {
    "PYTHON_IMAGE": "local/python:3.11",
    "RABBITMQ_IMAGE": "local/rabbitmq:3.10-management",
    "REDIS_IMAGE": "local/redis:7",
    "POSTGRES_IMAGE": "local/postgres:15",
}
CENTRAL_FILES = ["docker-compose.yml", "deploy/tls.compose.yml", "tests/compose/central.yml"]
REGION_FILES = ["deploy/region.compose.yml", "tests/compose/region.yml"]
# Run in the region's worker container: can it open a TCP connection to each HOST:PORT?
PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        print(target, "open")
    except OSError as exc:
        print(target, "closed", type(exc).__name__)
"""
ACCESS_RE = re.compile(r"^ACCESS (\S+) (\S+)$", re.M)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Write a line to the terminal even while pytest captures output (the CI log)."""
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if terminal is None or capture is None:
            print(f"[compose] {line}")  # plugins disabled (-p no:terminal): captured output
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"[compose] {line}")

    return write


@dataclass
class Stack:
    engine: DockerEngine
    central: Compose
    region: Compose
    phases: Phases
    report: Callable[[str], None]
    token: str
    states: dict[str, str] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)

    def api(self, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{PORTS['API_PORT']}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def rabbitmqctl(self, *args: str) -> list[list[str]]:
        """Rows of `rabbitmqctl -q ARGS` in the broker container, header dropped."""
        out = self.central.run("exec", "-T", "rabbitmq", "rabbitmqctl", "-q", *args, timeout=120)
        return [line.split("\t") for line in out.splitlines()[1:] if line.strip()]

    def psql(self, sql: str) -> list[list[str]]:
        out = self.central.run(
            "exec", "-T", "postgres", "psql", "-U", "geoscrape", "-d", "geoscrape",
            "-At", "-F", "\t", "-c", sql,
        )  # fmt: skip
        return [line.split("\t") for line in out.splitlines() if line]

    def addresses(self, container: str) -> dict[str, str]:
        """network name -> the container's address on it."""
        fmt = "{{range $n, $e := .NetworkSettings.Networks}}{{$n}}={{$e.IPAddress}} {{end}}"
        pairs = self.engine.docker("inspect", "-f", fmt, container).split()
        return dict(pair.split("=", 1) for pair in pairs)

    def access_log(self) -> list[tuple[str, str]]:
        (site,) = self.central.containers("geosite")
        logs = self.engine.docker("logs", site, timeout=60)
        return ACCESS_RE.findall(logs)


def _queues(stack: Stack) -> dict[str, int]:
    rows = stack.rabbitmqctl("list_queues", "-p", "geoscrape", "name", "consumers")
    return {name: int(consumers) for name, consumers in rows}


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    report: Callable[[str], None],
) -> Iterator[Stack]:
    phases = Phases(report)
    root = tmp_path_factory.mktemp("compose")
    engine = DockerEngine(tmp_path_factory.mktemp("docker"))
    token = secrets.token_hex(8)
    secrets_env = {
        "GEOSCRAPE_ADMIN_PASSWORD": secrets.token_hex(8),
        "GEOSCRAPE_DB_PASSWORD": secrets.token_hex(8),
        "GEOSCRAPE_API_TOKEN": token,
        **{f"GEOSCRAPE_BROKER_PASSWORD_{r.upper()}": secrets.token_hex(8) for r in REGIONS},
    }
    wan = f"geoscrape-e2e-wan-{secrets.token_hex(3)}"
    # Files the containers read: world-readable, in directories they can enter.
    root.chmod(0o755)
    sites = root / "sites.yaml"
    sites.write_text((ROOT / "tests/compose/sites.yaml").read_text())
    sites.chmod(0o644)
    make_pki(root / "broker-tls", root / "region-tls", BROKER_NAME, "sa")
    central = Compose(
        engine, "gscentral", CENTRAL_FILES,
        {
            **IMAGES, **PORTS, **secrets_env,
            "PUBLISH_ADDRESS": "127.0.0.1",
            "GEOSCRAPE_SITES_FILE": str(sites),
            "BROKER_TLS_DIR": str(root / "broker-tls"),
            "WAN_NETWORK": wan,
            "GEOSCRAPE_RUN_LEASE": "6",  # redeliver a killed worker's run quickly
        },
    )  # fmt: skip
    region_env = root / "region.env"  # what docs/DEPLOY.md has the region's operator write
    region_env.write_text(
        "GEOSCRAPE_REGION=sa\n"
        f"GEOSCRAPE_BROKER_URL=amqps://geoscrape-sa:{secrets_env['GEOSCRAPE_BROKER_PASSWORD_SA']}"
        f"@{BROKER_NAME}:5671/geoscrape\n"
        f"GEOSCRAPE_TLS_DIR={root / 'region-tls'}\n"
        f"GEOSCRAPE_SITES_FILE={sites}\n"
        f"WAN_NETWORK={wan}\n"
        f"PYTHON_IMAGE={IMAGES['PYTHON_IMAGE']}\n"
    )
    region = Compose(engine, "gsregion", REGION_FILES, {}, env_file=region_env)
    built = Stack(engine, central, region, phases, report, token)
    failed_before = request.session.testsfailed
    # A CI job cancelled with SIGTERM still tears everything down (the daemon is
    # in its own session, so nothing else would stop it).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with phases("start the private Docker engine"):
            engine.start()
        _build_images(engine, root, phases, report)
        _bring_up(built)
        yield built
    except BaseException:
        _dump(built)
        raise
    else:
        if request.session.testsfailed > failed_before:
            _dump(built)
    finally:
        try:
            _tear_down(built)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _build_images(
    engine: DockerEngine, root: Path, phases: Phases, report: Callable[[str], None]
) -> None:
    script = str(ROOT / "deploy/offline/build.sh")
    started: list[subprocess.Popen[str]] = []

    def run(*argv: str, what: str) -> subprocess.Popen[str]:
        with (root / f"{what}.log").open("w") as log:
            process = subprocess.Popen(
                argv, cwd=ROOT, env={**engine.env, "WORK": str(root / what), "TMPDIR": str(root)},
                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
        started.append(process)
        return process

    def finish(process: subprocess.Popen[str], what: str) -> None:
        code = process.wait(timeout=1200)
        text = (root / f"{what}.log").read_text()
        for line in text.splitlines():
            if line.startswith("offline:"):
                report(line)
        assert code == 0, f"{what} failed (exit {code}):\n{text[-4000:]}"

    try:
        with phases("mmdebstrap + import local/debian:bookworm"):
            finish(run("bash", script, "debian", what="debian"), "debian")
        with phases("build stand-ins and the geoscrape image (parallel)"):
            services = run("bash", script, "rabbitmq", "redis", "postgres", what="services")
            finish(run("bash", script, "python", what="python"), "python")
            begun = time.monotonic()
            image = run(
                "docker", "build", "--network", "host",
                "--build-arg", f"PYTHON_IMAGE={IMAGES['PYTHON_IMAGE']}",
                "-t", "geoscrape:latest", str(ROOT), what="geoscrape",
            )  # fmt: skip
            finish(image, "geoscrape")
            report(f"built geoscrape:latest in {time.monotonic() - begun:.0f} s")
            finish(services, "services")
    finally:
        # Interrupted or failed: stop the builds still running (each in its own session).
        # SIGTERM first: mmdebstrap then unmounts what it mounted in its chroot.
        for process in started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)


def _bring_up(stack: Stack) -> None:
    central, phases, report = stack.central, stack.phases, stack.report
    with phases("central: broker, store, redis up; provision the region users"):
        central.run("up", "-d", "--no-build", "rabbitmq", "postgres", "redis")
        definitions = central.run("run", "--rm", "--no-deps", "-T", "provision")
        wait_for(
            "rabbitmq healthy",
            lambda: central.states().get("gscentral_rabbitmq_1") == "running (healthy)",
            deadline=240,
        )
        # Healthy means the rabbit app runs; await_startup makes sure of it anyway,
        # since import_definitions fails outright while the app boots.
        central.run("exec", "-T", "rabbitmq", "rabbitmqctl", "await_startup", timeout=240)
        central.run(
            "exec", "-T", "rabbitmq", "rabbitmqctl", "import_definitions", "--format", "json",
            input=definitions,
        )  # fmt: skip
        # The import is asynchronous: wait for the users before a worker logs in.
        wanted = {f"geoscrape-{r}" for r in REGIONS}

        def users() -> set[str] | None:
            names = {row[0] for row in stack.rabbitmqctl("list_users")}
            return names if names >= wanted else None

        found = wait_for("the region users", users, deadline=60)
        report(f"broker users: {sorted(found)}")
    with phases("central: up -d (migrate, beat, ingest, api, flower, workers; eu x2)"):
        central.run("up", "-d", "--no-build", "--scale", "worker-eu=2", timeout=600)
    with phases("region in another cloud: up -d (amqps)"):
        stack.region.run("up", "-d", "--no-build")
    with phases("wait: every service up, every queue consumed, the API answering"):
        expected = {"scrape.eu": 2, "scrape.us": 1, "scrape.asia": 1, "scrape.sa": 1, "ingest": 1}

        def consumed() -> dict[str, int] | None:
            queues = _queues(stack)
            return queues if all(queues.get(k) == v for k, v in expected.items()) else None

        stack.queues = wait_for(f"consumers {expected}", consumed, deadline=300, interval=2)
        wait_for("the API's /health", lambda: stack.api("/health") == {"status": "ok"}, 120)
        stack.states = {**central.states(), **stack.region.states()}
    for name, state in sorted(stack.states.items()):
        report(f"service {name:<28} {state}")
    report(f"queues (name: consumers): {stack.queues}")


def _dump(stack: Stack) -> None:
    for project in (stack.central, stack.region):
        stack.report(project.diagnostics())
    stack.report("== dockerd log (tail)\n" + stack.engine.log_tail())


def _tear_down(stack: Stack) -> None:
    engine, report, phases = stack.engine, stack.report, stack.phases
    try:
        with phases("teardown"):
            for project in (stack.region, stack.central):  # the region uses the central wan
                try:
                    project.down()
                except ComposeError as exc:
                    report(f"teardown: {exc}")
            if engine.socket.exists():
                left = engine.leftovers()
                report(f"after compose down: {left}")
                engine.remove_everything()
                left = engine.leftovers()
                images = engine.docker("images", "-aq").split()
                report(f"after removing everything: {left}, images: {len(images)}")
                assert not any(left.values()) and not images, f"left behind: {left} {images}"
    finally:
        engine.stop()
        mounts = mounts_under(engine.root)
        report(f"engine stopped; mounts left under {engine.root}: {mounts or 'none'}")
        report(stack.phases.summary())
    assert not mounts, f"mounts left behind: {mounts}"


# -- one crawl of every region, with the crawling eu worker killed -------------


@dataclass
class Crawl:
    run_ids: dict[str, str]  # region -> run id
    runs: dict[str, dict[str, Any]]  # region -> the API's run row
    items: dict[str, list[dict[str, Any]]]  # region -> the API's item rows
    access: list[tuple[str, str]]  # (client address, path) in order
    workers: dict[str, dict[str, str]]  # container -> {region, address on its region's net}
    killed: str
    killed_after_requests: int
    recovery_seconds: float


def _worker_addresses(stack: Stack) -> dict[str, dict[str, str]]:
    found = {}
    for region in CENTRAL_REGIONS:
        for name in stack.central.containers(f"worker-{region}"):
            addresses = stack.addresses(name)
            found[name] = {"region": region, "address": addresses[f"gscentral_net-{region}"]}
    for name in stack.region.containers("worker"):
        found[name] = {"region": "sa", "address": next(iter(stack.addresses(name).values()))}
    return found


@pytest.fixture(scope="module")
def crawl(stack: Stack) -> Crawl:
    report = stack.report
    workers = _worker_addresses(stack)
    eu_by_address = {w["address"]: n for n, w in workers.items() if w["region"] == "eu"}
    with stack.phases("crawl every region from the api container; kill the crawling eu worker"):
        out = stack.central.run("exec", "-T", "api", "geoscrape", "crawl", "shop")
        run_ids = {m[1]: m[0] for m in re.findall(r"queued run (\S+) for shop in (\S+)", out)}
        assert sorted(run_ids) == sorted(REGIONS), out

        def crawling_eu_worker() -> tuple[str, int] | None:
            counts = Counter(a for a, _ in stack.access_log() if a in eu_by_address)
            busiest = counts.most_common(1)
            return (busiest[0][0], busiest[0][1]) if busiest and busiest[0][1] >= 3 else None

        address, requests = wait_for("the eu crawl's first requests", crawling_eu_worker, 240, 0.5)
        killed = eu_by_address[address]
        stack.engine.docker("kill", killed)
        killed_at = time.monotonic()
        report(f"killed {killed} ({address}) after its {requests}th request to the site")

        def finished() -> dict[str, dict[str, Any]] | None:
            rows = stack.api("/runs?site=shop&limit=50")["data"]
            runs = {r["region"]: r for r in rows if r["id"] in run_ids.values()}
            final = {"succeeded", "failed", "dead", "expired", "skipped"}
            done = len(runs) == len(REGIONS) and all(r["status"] in final for r in runs.values())
            return runs if done else None

        runs = wait_for("every region's run to finish", finished, deadline=420, interval=2)
        recovery = time.monotonic() - killed_at
        report(f"eu run finished {recovery:.0f} s after the kill (lease 6 s)")
    items = {
        region: stack.api(f"/sites/shop/items?region={region}&limit=500")["data"]
        for region in REGIONS
    }
    for region in REGIONS:
        run = runs[region]
        report(
            f"run {region:<5} {run['status']:<10} worker {run['worker']:<24} "
            f"pages {run['stats'].get('pages')} items {run['stats'].get('items')}"
        )
    return Crawl(run_ids, runs, items, stack.access_log(), workers, killed, requests, recovery)


def test_the_stack_comes_up_with_every_service_and_queue(stack: Stack) -> None:
    states = stack.states
    for service in ["rabbitmq", "postgres", "redis"]:
        assert states[f"gscentral_{service}_1"] == "running (healthy)", states
    assert states["gscentral_migrate_1"] == "exited (0)", states
    running = [
        "beat", "ingest", "api", "flower", "geosite", "gateway",
        "worker-eu", "worker-us", "worker-asia",
    ]  # fmt: skip
    for service in running:
        assert states[f"gscentral_{service}_1"].startswith("running"), (service, states)
    assert states["gscentral_worker-eu_2"].startswith("running"), states
    assert states["gsregion_worker_1"].startswith("running"), states
    assert stack.queues["scrape.dead"] == 1  # ingest consumes the dead letters too


def test_one_crawl_from_the_api_container_stores_each_regions_own_prices(
    stack: Stack, crawl: Crawl
) -> None:
    locales = {
        region: Locale(f"{SUBNETS[region]}0/24", *EXAMPLE_LOCALES.get(region, ("BRL", 5.5)))
        for region in REGIONS
    }
    catalog = GeoCatalog(locales, products=PRODUCTS)
    for region in REGIONS:
        assert crawl.runs[region]["status"] == "succeeded", crawl.runs[region]
        got = {i["key"]: (i["data"]["price"], i["data"]["currency"]) for i in crawl.items[region]}
        want = {e["sku"]: (e["price"], e["currency"]) for e in catalog.expected_items_in(region)}
        assert got == want, region
        sample = sorted(got.items())[:2]
        stack.report(f"prices via the API, {region:<5}: {len(got)} items, e.g. {sample}")


def test_each_regions_requests_come_only_from_its_own_workers(stack: Stack, crawl: Crawl) -> None:
    by_address = {w["address"]: (name, w["region"]) for name, w in crawl.workers.items()}
    per_region: Counter[str] = Counter()
    per_container: Counter[str] = Counter()
    for address, path in crawl.access:
        assert address in by_address, f"{address} asked for {path}: not a worker of any region"
        name, region = by_address[address]
        assert address.startswith(SUBNETS[region])
        per_region[region] += 1
        per_container[name] += 1
    for region in REGIONS:
        stack.report(f"access log {region:<5}: {per_region[region]} requests")
    for name, count in sorted(per_container.items()):
        stack.report(f"access log {name:<28} {count} requests")
    # 1 robots.txt, the index, categories and 24 products at least, in every region
    assert all(per_region[r] >= PRODUCTS + 2 for r in REGIONS), per_region


def test_killing_the_crawling_eu_worker_loses_and_duplicates_nothing(
    stack: Stack, crawl: Crawl
) -> None:
    eu = crawl.runs["eu"]
    assert eu["status"] == "succeeded", eu
    (survivor,) = [n for n, w in crawl.workers.items() if w["region"] == "eu" and n != crawl.killed]
    assert eu["worker"] and eu["worker"].startswith("eu@"), eu
    # The redelivered run's requests came from the surviving eu container.
    survivor_address = crawl.workers[survivor]["address"]
    assert any(a == survivor_address for a, _ in crawl.access), "the survivor never crawled"
    rows = stack.psql(
        "SELECT region, count(*), count(DISTINCT key) FROM observations "
        f"WHERE run_id IN ({', '.join(repr(i) for i in crawl.run_ids.values())}) GROUP BY region"
    )
    counts = {region: (int(total), int(distinct)) for region, total, distinct in rows}
    for region in REGIONS:
        total, distinct = counts[region]
        lost, duplicated = PRODUCTS - distinct, total - distinct
        stack.report(f"store {region:<5}: {total} observations, lost {lost}, dup. {duplicated}")
        assert (lost, duplicated) == (0, 0), region
    stack.report(
        f"kill recovery: {crawl.killed} killed after {crawl.killed_after_requests} requests, "
        f"run succeeded {crawl.recovery_seconds:.0f} s later on {survivor}"
    )


def test_a_region_in_another_cloud_reaches_only_the_brokers_tls_port(
    stack: Stack, crawl: Crawl
) -> None:
    assert crawl.runs["sa"]["status"] == "succeeded", crawl.runs["sa"]
    assert {i["data"]["currency"] for i in crawl.items["sa"]} == {"BRL"}
    connections = stack.rabbitmqctl("list_connections", "user", "ssl", "peer_cert_subject")
    sa = [c for c in connections if c[0] == "geoscrape-sa"]
    assert sa and all(c[1:] == ["true", "CN=region-sa"] for c in sa), connections
    # Its channels consume scrape.sa and nothing else.
    channels = {row[0]: row[1] for row in stack.rabbitmqctl("list_channels", "pid", "user")}
    consumers = stack.rabbitmqctl("list_consumers", "-p", "geoscrape", "queue_name", "channel_pid")
    consumed = {queue for queue, pid in consumers if channels.get(pid) == "geoscrape-sa"}
    assert consumed == {"scrape.sa"}, consumers
    (worker,) = stack.region.containers("worker")
    out = stack.engine.docker(
        "exec", worker, "python", "-c", PROBE,
        f"{BROKER_NAME}:5671", f"{BROKER_NAME}:5672", f"{BROKER_NAME}:15672", "rabbitmq:5672",
    )  # fmt: skip
    stack.report(f"from the region's worker: {out.strip().replace(chr(10), '; ')}")
    lines = out.splitlines()
    assert lines[0] == f"{BROKER_NAME}:5671 open", out
    assert all(" closed " in line for line in lines[1:]), out
    stack.report(
        f"amqps region: run {crawl.runs['sa']['status']}, {len(crawl.items['sa'])} items in BRL, "
        f"connections {sa}, consuming {sorted(consumed)}"
    )
