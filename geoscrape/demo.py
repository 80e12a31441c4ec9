"""`geoscrape demo`: the whole pipeline on one machine, started and stopped for you.

It serves the bundled test shop, starts `geoscrape ingest` and one
`geoscrape worker` per demo region as child processes (the same commands a
deployment runs), dispatches one crawl, shows progress and prints the items.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from geoscrape import output

DEMO_REGIONS = ("eu", "us")
SITE = "demo-shop"

SITES_YAML = """\
# Written by `geoscrape demo`: the bundled shop, crawled from two regions.
regions:
  eu: {{}}
  us: {{}}

defaults:
  politeness: {{delay: 0, concurrency: 8, robots: obey}}
  limits: {{max_pages: 500, max_depth: 5, timeout: 10s, max_bytes: 2MB}}
  allow_hosts: ["{host_port}"]   # the shop is on loopback, which the SSRF guard refuses otherwise

sites:
"""


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "geoscrape.cli", *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _stop_all(procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    """SIGTERM every child at once (each shuts down gracefully), then reap them."""
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc, _ in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run_demo(console: Console, *, products: int = 24, keep: Path | None = None) -> int:
    from geoscrape.progress import wait_for_runs
    from geoscrape.testsite import Catalog, serve
    from geoscrape.testsite.config import shop_site_yaml
    from regions.bus import broker_url, check_broker
    from scheduler.dispatch import plan_jobs, publish_jobs
    from scheduler.loader import load_config
    from storage.db import make_engine, session_factory
    from storage.migrate import upgrade
    from storage.queries import list_items

    check_broker()
    workdir = keep or Path(tempfile.mkdtemp(prefix="geoscrape-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'demo.db'}"
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    with ExitStack() as stack:
        if keep is None:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        shop = stack.enter_context(serve(catalog=Catalog(products=products)))
        config_path = workdir / "sites.yaml"
        config_path.write_text(
            SITES_YAML.format(host_port=f"{shop.host}:{shop.port}")
            + shop_site_yaml(SITE, shop.url, regions=", ".join(DEMO_REGIONS))
        )
        config = load_config(config_path)
        console.print(f"demo shop with {products} products at {shop.url}", highlight=False)
        upgrade(db_url)

        env = {
            **os.environ,
            "GEOSCRAPE_CONFIG": str(config_path),
            "GEOSCRAPE_DATABASE_URL": db_url,
            "GEOSCRAPE_BROKER_URL": broker_url(),
            "PYTHONUNBUFFERED": "1",
        }
        stack.callback(_stop_all, procs)
        for name, args in [
            ("ingest", ["ingest"]),
            *((f"worker-{r}", ["worker", "--region", r]) for r in DEMO_REGIONS),
        ]:
            log = workdir / f"{name}.log"
            procs.append((name, _spawn(args, env, log), log))
        console.print(
            f"started ingest and workers for {', '.join(DEMO_REGIONS)} (logs in {workdir})",
            highlight=False,
        )

        jobs = plan_jobs(config, SITE, trigger="demo")
        publish_jobs(jobs)
        console.print(f"dispatched {len(jobs)} runs of {SITE}; waiting for results")
        try:
            runs = wait_for_runs(db_url, [j.run_id for j in jobs], timeout=300, console=console)
        except Exception:
            for name, proc, log in procs:
                state = "running" if proc.poll() is None else f"exited {proc.returncode}"
                console.print(f"--- {name} ({state}), last lines:\n{_tail(log)}", markup=False)
            raise
        output.print_runs(console, runs)
        with session_factory(make_engine(db_url))() as session:
            found = list_items(session, SITE)
        output.print_items(console, found, output.Format.table)
        if keep:
            console.print(
                f"kept {workdir}: try GEOSCRAPE_DATABASE_URL={db_url} geoscrape runs",
                highlight=False,
            )
    return 0 if all(r.status == "succeeded" for r in runs) else 1
