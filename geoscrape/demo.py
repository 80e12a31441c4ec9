"""`geoscrape demo`: the whole pipeline on one machine, with real regional differences.

It serves the bundled geo shop on loopback, starts `geoscrape ingest` and one
`geoscrape worker` per demo region as child processes (the same commands a
deployment runs), dispatches one crawl, shows progress, then prints what makes
geoscrape worth using: prices per region side by side (`compare --only-diff`),
the access verdicts (one region geo-blocked) and the dashboard's URL.

Regional differences without root: every address in 127.0.0.0/8 is local on
Linux, so each region's worker sends from its own loopback address
(`egress.source_address`: eu 127.0.0.11, us 127.0.0.12, asia 127.0.0.13) and
the shop prices and blocks by source address (testsite/geo.py).

Isolation: the demo runs on a RabbitMQ vhost of its own (created with
`rabbitmqctl`, deleted afterwards), so other consumers on the broker's default
vhost cannot take its jobs or results. It waits without a time limit while
its processes live; when nothing moves for a while it says what it observes
(queue depth and consumers of each waiting region's queue, worker processes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from rich.console import Console

from geoscrape import output
from regions.errors import RegionsError

if TYPE_CHECKING:
    from geoscrape.testsite.geo import GeoCatalog
    from storage.queries import RunRow

SITE = "demo-shop"
POLL_SECONDS = 0.5
HINT_AFTER_SECONDS = 30.0  # with no progress for this long, say what is observed


@dataclass(frozen=True)
class DemoRegion:
    name: str
    source_address: str
    currency: str
    rate: float
    blocked: bool = False


DEMO_REGIONS = (
    DemoRegion("eu", "127.0.0.11", "EUR", 1.0),
    DemoRegion("us", "127.0.0.12", "USD", 1.1),
    DemoRegion("asia", "127.0.0.13", "JPY", 160.0, blocked=True),
)

SITES_YAML = """\
# Written by `geoscrape demo`: the bundled geo shop, crawled from three regions,
# each sending from its own loopback address.
regions:
{regions}
defaults:
  politeness: {{delay: 0, concurrency: 8, robots: obey}}
  limits: {{max_pages: 500, max_depth: 5, timeout: 10s, max_bytes: 2MB}}
  allow_hosts: ["{host_port}"]   # the shop is on loopback, which the SSRF guard refuses otherwise

sites:
"""


class DemoError(RegionsError):
    """The demo could not run (a worker died, the broker refused...)."""


def demo_config(host_port: str, shop_url: str) -> str:
    from geoscrape.testsite.config import shop_site_yaml

    regions = "".join(
        f"  {r.name}:\n    egress:\n      source_address: {r.source_address}\n"
        for r in DEMO_REGIONS
    )
    names = ", ".join(r.name for r in DEMO_REGIONS)
    return SITES_YAML.format(regions=regions, host_port=host_port) + shop_site_yaml(
        SITE, shop_url, regions=names
    )


def demo_catalog(products: int) -> GeoCatalog:
    from geoscrape.testsite.geo import GeoCatalog, Locale

    return GeoCatalog(
        {r.name: Locale(f"{r.source_address}/32", r.currency, r.rate) for r in DEMO_REGIONS},
        blocked={r.name: ["/"] for r in DEMO_REGIONS if r.blocked},
        products=products,
    )


# -- the demo's own vhost -------------------------------------------------------


def _rabbitmqctl(*args: str) -> str | None:
    """Run rabbitmqctl; None on success, else why not (one line)."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl not found"
    try:
        done = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit {done.returncode}"
    return None


def _with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@contextmanager
def own_vhost(console: Console, url: str) -> Iterator[str]:
    """A fresh vhost for the demo, deleted afterwards; yields its broker URL.

    Creating a vhost needs rabbitmqctl (root or the rabbitmq user). Without it
    the demo says so and runs on the configured vhost, where other consumers
    of the same queues can take its jobs.
    """
    name = f"geoscrape-demo-{uuid.uuid4().hex[:8]}"
    user = urlsplit(url).username or "guest"
    problem = _rabbitmqctl("add_vhost", name)
    if problem is None:
        problem = _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        if problem is not None:
            _rabbitmqctl("delete_vhost", name)
    if problem is not None:
        vhost = urlsplit(url).path[1:] or "/"
        console.print(
            f"warning: cannot create a vhost of the demo's own ({problem}); running on "
            f"vhost {vhost!r}, where other consumers of its queues may take its jobs",
            highlight=False,
        )
        yield url
        return
    console.print(f"broker vhost {name} (deleted at the end)", highlight=False)
    try:
        yield _with_vhost(url, name)
    finally:
        _rabbitmqctl("delete_vhost", name)


# -- child processes -----------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def state(self) -> str:
        code = self.proc.poll()
        return f"running (pid {self.proc.pid})" if code is None else f"exited {code}"


def _spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geoscrape.cli", *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Child(name, proc, log)


def _stop_all(children: list[Child]) -> None:
    """SIGTERM every child at once (each shuts down gracefully), then reap them."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# -- waiting -------------------------------------------------------------------


def _observed(url: str, regions: list[str], children: dict[str, Child]) -> list[str]:
    """What the demo sees of each waiting region: its queue and its worker process."""
    from regions.bus import connect, queue_depth, scrape_queue_name

    lines = []
    with connect(url) as conn:
        for region in regions:
            queue = scrape_queue_name(region)
            depth = queue_depth(conn, queue)
            seen = (
                "does not exist"
                if depth is None
                else f"{depth[0]} job(s) ready, {depth[1]} consumer(s)"
            )
            worker = children.get(f"worker-{region}")
            lines.append(
                f"  {region}: queue {queue}: {seen}; "
                f"worker-{region}: {worker.state() if worker else 'not started'}"
            )
    ingest = children.get("ingest")
    lines.append(f"  ingest: {ingest.state() if ingest else 'not started'}")
    return lines


def wait_for_demo_runs(
    console: Console, db_url: str, broker: str, run_ids: list[str], children: dict[str, Child]
) -> list[RunRow]:
    """Poll the store until every run is final: no time limit while the children live.

    A child that exits ends the wait with its log; nothing moving for
    HINT_AFTER_SECONDS prints what is observed, then the wait goes on.
    """
    from regions.messages import FINAL_STATUSES
    from storage.db import make_engine, session_factory
    from storage.queries import get_runs

    sessions = session_factory(make_engine(db_url))
    last: dict[str, str] = {}
    moved = time.monotonic()
    while True:
        with sessions() as session:
            runs = get_runs(session, run_ids)
        for run in runs:
            stats = run.stats or {}
            line = (
                f"{run.region}: {run.status}, {stats.get('pages', 0)} pages, "
                f"{stats.get('items', 0)} items"
            )
            if last.get(run.id) != line:
                console.print(line, highlight=False)
                last[run.id] = line
                moved = time.monotonic()
        if len(runs) == len(run_ids) and all(r.status in FINAL_STATUSES for r in runs):
            return runs
        dead = [c for c in children.values() if c.proc.poll() is not None]
        if dead:
            for child in dead:
                console.print(
                    f"--- {child.name} {child.state()}, last lines:\n{_tail(child.log)}",
                    markup=False,
                )
            raise DemoError(f"{', '.join(c.name for c in dead)} exited before the runs ended")
        if time.monotonic() - moved > HINT_AFTER_SECONDS:
            waiting = [r.region for r in runs if r.status not in FINAL_STATUSES]
            unseen = len(run_ids) - len(runs)
            console.print(
                f"no progress for {HINT_AFTER_SECONDS:.0f}s; still waiting for "
                f"{', '.join(waiting) or '-'}"
                + (f" and {unseen} run(s) ingest has not recorded" if unseen else "")
                + "; observed:",
                highlight=False,
            )
            for line in _observed(broker, waiting, children):
                console.print(line, highlight=False, markup=False)
            moved = time.monotonic()
        time.sleep(POLL_SECONDS)


def print_access_log(console: Console, log: list[tuple[str, str]]) -> None:
    """Requests per client address: proof that each region sent from its own."""
    by_address = Counter(client for client, _ in log)
    names = {r.source_address: r.name for r in DEMO_REGIONS}
    console.print("shop access log, requests per client address:", highlight=False)
    for address, count in sorted(by_address.items()):
        console.print(
            f"  {address} ({names.get(address, 'not a demo region')}): {count} requests",
            highlight=False,
        )


def _wait_for_ctrl_c() -> None:
    """Block until SIGINT or SIGTERM.

    Both get a handler of their own: a process started in the background by a
    shell inherits SIGINT ignored, and must still stop on it.
    """
    stop = threading.Event()
    old = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.2):
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_demo(
    console: Console,
    *,
    products: int = 24,
    keep: Path | None = None,
    ui: bool = True,
    ui_port: int = 0,
) -> int:
    from geoscrape.query_views import print_access, print_compare
    from geoscrape.testsite import serve
    from regions.bus import broker_url, check_broker
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config
    from storage.access import access
    from storage.compare import compare
    from storage.db import make_engine, session_factory
    from storage.migrate import upgrade

    check_broker()
    workdir = keep or Path(tempfile.mkdtemp(prefix="geoscrape-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'demo.db'}"
    children: dict[str, Child] = {}
    with ExitStack() as stack:
        if keep is None:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        broker = stack.enter_context(own_vhost(console, broker_url()))
        shop = stack.enter_context(serve(catalog=demo_catalog(products)))
        config_path = workdir / "sites.yaml"
        config_path.write_text(demo_config(f"{shop.host}:{shop.port}", shop.url))
        config = load_config(config_path)
        console.print(f"demo shop with {products} products at {shop.url}", highlight=False)
        upgrade(db_url)

        env = {
            **os.environ,
            "GEOSCRAPE_CONFIG": str(config_path),
            "GEOSCRAPE_DATABASE_URL": db_url,
            "GEOSCRAPE_BROKER_URL": broker,
            "PYTHONUNBUFFERED": "1",
        }
        stack.callback(lambda: _stop_all(list(children.values())))
        for name, args in [
            ("ingest", ["ingest"]),
            *((f"worker-{r.name}", ["worker", "--region", r.name]) for r in DEMO_REGIONS),
        ]:
            children[name] = _spawn(name, args, env, workdir)
        console.print(
            "started ingest and one worker per region: "
            + ", ".join(f"{r.name} from {r.source_address}" for r in DEMO_REGIONS)
            + f" (logs in {workdir})",
            highlight=False,
        )

        jobs = plan_jobs(config, SITE, trigger="demo")
        publish_jobs(jobs, broker)
        console.print(f"dispatched {len(jobs)} runs of {SITE}; waiting for results")
        runs = wait_for_demo_runs(console, db_url, broker, [j.run_id for j in jobs], children)
        output.print_runs(console, runs)
        with session_factory(make_engine(db_url))() as session:
            print_compare(
                console, compare(session, SITE, fields=["price", "currency"], only_diff=True)
            )
            print_access(console, access(session, SITE, rounds=1))
        print_access_log(console, shop.access_log)
        if keep:
            (workdir / "shop-access.log").write_text(
                "".join(f"{client} {path}\n" for client, path in shop.access_log)
            )
            console.print(
                f"kept {workdir}: try GEOSCRAPE_DATABASE_URL={db_url} geoscrape runs",
                highlight=False,
            )
        ok = all(r.status == "succeeded" for r in runs)
        if ui:
            port = ui_port or _free_port("127.0.0.1")
            children["api"] = _spawn(
                "api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, workdir
            )
            console.print(
                f"dashboard: http://127.0.0.1:{port}/  (Ctrl-C stops the demo)", highlight=False
            )
            _wait_for_ctrl_c()
    return 0 if ok else 1
