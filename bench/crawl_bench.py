"""Crawl benchmark: geoscrape against bare Scrapy on a generated static site.

    make bench-crawl     # or: .venv/bin/python -m bench.crawl_bench [--pages 2000 --rounds 3]

A static site of `--pages` pages (a binary tree of links, one item per page)
is written to a temporary directory and served by nginx on 127.0.0.1:18731,
its access log with millisecond times. Every figure is measured side by side
in the same run; times are medians of `--rounds` rounds:

- bare `scrapy runspider` (same link rules, same extraction, same
  concurrency) until its feed file is written, vs `geoscrape crawl --wait`
  with one worker and ingest (dispatch -> stored in PostgreSQL);
- a `distributed: true` run over 2 workers vs 1 worker;
- one-page `engine: requests` jobs, dispatch -> stored, p50/p90;
- ingest: items/s from the bus into PostgreSQL vs a plain SQLAlchemy Core
  insert of the same rows in batches of 100;
- the shared budget: 2 regions x 2 workers, `rate: 20/s`, the requests/s the
  access log shows and the most in any 1-second window.

Needs RabbitMQ (a vhost of its own, deleted after), PostgreSQL (a database of
its own, dropped after), Redis (a key prefix of its own) and nginx.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests.harness import Stack, wait_until
from tests.pagesite import max_in_window

PORT = 18731
MEASURES = ("scrapy", "distributed", "latency", "budget", "ingest")
ADMIN = os.environ.get("GEOSCRAPE_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("GEOSCRAPE_BENCH_AMQP_HOST", "guest:guest@127.0.0.1:5672")
CONCURRENCY = 16

SPIDER = """
import scrapy
from scrapy.linkextractors import LinkExtractor


class Bench(scrapy.Spider):
    name = "bench"
    start_urls = ["{base}/p/0.html"]
    links = LinkExtractor(allow=["/p/"])

    def parse(self, response):
        yield {{"id": response.css(".id::text").get(), "title": response.css("h1::text").get()}}
        for link in self.links.extract_links(response):
            yield response.follow(link.url, callback=self.parse)
"""


def page(n: int, pages: int) -> str:
    links = " ".join(
        f'<a href="/p/{c}.html">page {c}</a>' for c in (2 * n + 1, 2 * n + 2) if c < pages
    )
    return (
        f"<html><head><title>Page {n}</title></head><body><h1>Page {n}</h1>"
        f'<span class="id">{n}</span><p>{links}</p></body></html>'
    )


def write_site(root: Path, pages: int) -> None:
    (root / "p").mkdir(parents=True)
    (root / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    for n in range(pages):
        (root / "p" / f"{n}.html").write_text(page(n, pages))


@contextmanager
def nginx(workdir: Path, port: int) -> Iterator[Path]:
    """nginx serving workdir/site on port; yields its access log ($msec path agent)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    log = workdir / "access.log"
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 2;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format bench '$msec $request_uri "$http_user_agent"';
  access_log {log} bench;
  client_body_temp_path {workdir}/tmp;
  proxy_temp_path {workdir}/tmp;
  fastcgi_temp_path {workdir}/tmp;
  uwsgi_temp_path {workdir}/tmp;
  scgi_temp_path {workdir}/tmp;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {workdir}/site;
    default_type text/html;
  }}
}}
"""
    )
    (workdir / "tmp").mkdir()
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)])
    try:
        wait_until(lambda: log.exists(), timeout=30, what="nginx")
        yield log
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hits(log: Path, since: float, prefix: str = "/p/") -> list[float]:
    out = []
    for line in log.read_text().splitlines():
        at, path = line.split(" ", 2)[:2]
        if float(at) >= since and path.startswith(prefix):
            out.append(float(at))
    return out


@contextmanager
def vhost() -> Iterator[str]:
    name = f"geoscrape-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"amqp://{AMQP}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True)


@contextmanager
def database() -> Iterator[str]:
    name = f"geoscrape_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def site_yaml(base: str, pages: int) -> str:
    entry = """\
  - name: {name}
    start_urls: ["{base}/p/0.html"]
    regions: [{regions}]
    follow: {{allow: ["/p/"]}}
    extract:
      key: id
      fields: {{id: {{css: ".id::text"}}, title: {{css: "h1::text"}}}}
{extra}"""
    return (
        f"""\
regions: {{eu: {{}}, us: {{}}}}
defaults:
  politeness: {{delay: 0, concurrency: {CONCURRENCY}, robots: ignore}}
  limits: {{max_pages: {pages + 100}, max_depth: 50, timeout: 10s}}
  allow_hosts: ["127.0.0.1"]
sites:
"""
        + entry.format(name="full", base=base, regions="eu", extra="")
        + entry.format(name="shared", base=base, regions="eu", extra="    distributed: true\n")
        + f"""\
  - name: one
    engine: requests
    start_urls: ["{base}/p/0.html"]
    regions: [eu]
    extract: {{key: id, fields: {{id: {{css: ".id::text"}}}}}}
"""
        + "".join(
            entry.format(
                name=f"rate-{n}",
                base=base,
                regions="eu, us",
                extra=f'    politeness: {{rate: "20/s", user_agent: "rate-{n}"}}\n'
                "    limits: {max_pages: 100}\n",
            )
            for n in ("a", "b")
        )
    )


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def crawl(s: Stack, site: str) -> None:
    done = s.cli("crawl", site, "--wait", "--timeout", "900", timeout=1000)
    if done.returncode != 0:
        raise RuntimeError(f"crawl {site} failed:\n{done.stdout}\n{done.stderr}")


def bare_scrapy(workdir: Path, base: str) -> None:
    spider = workdir / "bench_spider.py"
    spider.write_text(SPIDER.format(base=base))
    feed = workdir / "items.jsonl"
    feed.unlink(missing_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "scrapy", "runspider", str(spider),
            "-o", f"{feed}:jsonlines", "-s", f"CONCURRENT_REQUESTS={CONCURRENCY}",
            "-s", f"CONCURRENT_REQUESTS_PER_DOMAIN={CONCURRENCY}", "-s", "DOWNLOAD_DELAY=0",
            "-s", "ROBOTSTXT_OBEY=False", "-s", "LOG_LEVEL=WARNING",
            "-s", "TELNETCONSOLE_ENABLED=False",
        ],
        check=True,
        cwd=workdir,
    )  # fmt: skip


def one_page_latency(s: Stack, n: int) -> list[float]:
    """Dispatch one-page jobs one at a time as the beat does (one app and connection,
    topology declared once: scheduler.dispatch.send_jobs); seconds from send to stored."""
    from sqlalchemy import text

    from regions.app import make_app
    from regions.bus import connect, declare_topology
    from scheduler.dispatch import plan_jobs, send_jobs
    from scheduler.loader import load_config
    from storage.db import make_engine

    config = load_config(str(s.config))
    engine = make_engine(s.db_url)
    app = make_app(s.broker_url)
    out = []
    with connect(s.broker_url) as conn, engine.connect() as db:
        declare_topology(conn, ["eu"])
        for _ in range(n):
            [job] = plan_jobs(config, "one", ["eu"])
            started = time.perf_counter()
            send_jobs(app, conn, [job])
            while True:
                status = db.execute(
                    text("SELECT status FROM runs WHERE id = :id"), {"id": job.run_id}
                ).scalar()
                db.commit()
                if status == "succeeded":
                    break
                if status == "failed":
                    raise RuntimeError("one-page job failed")
                time.sleep(0.002)
            out.append(time.perf_counter() - started)
    engine.dispose()
    return out


def ingest_rate(s: Stack, items: int) -> tuple[float, float]:
    """Items/s through `geoscrape ingest` vs a Core insert of the same rows."""
    import sqlalchemy as sa

    from regions.bus import connect, declare_topology, publish_ingest
    from regions.messages import ItemBatch, RunQueued, ScrapedItem, dump, utcnow
    from storage.db import make_engine

    run_id = str(uuid.uuid4())
    with connect(s.broker_url) as conn:
        declare_topology(conn, ["eu"])
        publish_ingest(
            conn,
            dump(RunQueued(run_id=run_id, site="ingest", region="eu", queued_at=utcnow())),
        )
        rows = [
            ScrapedItem(key=str(n), url=f"https://example.com/{n}", data={"id": n, "t": f"x{n}"})
            for n in range(items)
        ]
        for seq, start in enumerate(range(0, items, 100)):
            batch = ItemBatch(
                run_id=run_id,
                site="ingest",
                region="eu",
                seq=seq,
                observed_at=utcnow(),
                items=rows[start : start + 100],
            )
            publish_ingest(conn, dump(batch))
    engine = make_engine(s.db_url)

    def stored() -> int:
        with engine.connect() as c:
            return int(
                c.execute(
                    sa.text("SELECT count(*) FROM observations WHERE run_id = :r"), {"r": run_id}
                ).scalar()
                or 0
            )

    s.ingest()
    wait_until(lambda: stored() > 0, timeout=300, interval=0.01, what="ingest starts")
    first, t0 = stored(), time.perf_counter()
    wait_until(lambda: stored() >= items, timeout=900, interval=0.05, what="ingest done")
    ours = (items - first) / (time.perf_counter() - t0)
    s.stop("ingest")

    meta = sa.MetaData()
    table = sa.Table(
        f"bench_rows_{uuid.uuid4().hex[:6]}",
        meta,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String),
        sa.Column("site", sa.String),
        sa.Column("region", sa.String),
        sa.Column("key", sa.Text),
        sa.Column("url", sa.Text),
        sa.Column("data", sa.JSON),
    )
    meta.create_all(engine)
    values = [
        {
            "run_id": run_id,
            "site": "ingest",
            "region": "eu",
            "key": r.key,
            "url": r.url,
            "data": r.data,
        }
        for r in rows
    ]
    t0 = time.perf_counter()
    for start in range(0, items, 100):
        with engine.begin() as c:
            c.execute(sa.insert(table), values[start : start + 100])
    plain = items / (time.perf_counter() - t0)
    meta.drop_all(engine)
    engine.dispose()
    return ours, plain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--ingest-items", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=PORT, help="nginx's port (default %(default)s)")
    parser.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma-separated measures to run, of {', '.join(MEASURES)} (default: all)",
    )
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if not args.only <= set(MEASURES):
        parser.error(f"--only: unknown measure(s) {', '.join(sorted(args.only - set(MEASURES)))}")
    workdir = Path(tempfile.mkdtemp(prefix="geoscrape-bench-"))
    workdir.chmod(0o755)  # nginx's workers (nobody) read the site from here
    os.environ["GEOSCRAPE_REDIS_PREFIX"] = f"geoscrape-bench-{uuid.uuid4().hex[:8]}:"
    base = f"http://127.0.0.1:{args.port}"
    write_site(workdir / "site", args.pages)
    rows: list[tuple[str, str]] = []
    try:
        with nginx(workdir, args.port) as log, vhost() as amqp, database() as db:
            config = workdir / "sites.yaml"
            config.write_text(site_yaml(base, args.pages))
            s = Stack(workdir=workdir, broker_url=amqp, db_url=db, config=config)
            # This process publishes too (one-page jobs): to the bench's vhost only.
            os.environ["GEOSCRAPE_BROKER_URL"] = amqp
            os.environ["GEOSCRAPE_DATABASE_URL"] = db
            try:
                rows += run_all(s, workdir, base, log, args)
            finally:
                s.stop_all()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


def run_all(s: Stack, workdir: Path, base: str, log: Path, args: Any) -> list[tuple[str, str]]:
    from regions.bus import connect, declare_topology

    pages, rounds = args.pages, args.rounds
    with connect(s.broker_url) as conn:
        declare_topology(conn, ["eu", "us"])
    s.ingest()
    # Consuming means the schema is in place: the ingest measure counts rows right away.
    wait_until(lambda: "consuming" in s.log("ingest"), timeout=300, what="ingest to start")
    rows: list[tuple[str, str]] = []
    if "scrapy" in args.only:
        rows += scrapy_ratio(s, workdir, base, pages, rounds)
    if "distributed" in args.only:
        rows += distributed_ratio(s, rounds)
    if "latency" in args.only:
        rows += latency(s, args.latency_jobs)
    if "budget" in args.only:
        rows += shared_budget(s, log)
    s.stop(*[n for n in ("eu-1", "eu-2", "us-1", "us-2", "ingest") if n in s.procs])
    if "ingest" in args.only:
        # Each round side by side; the ratio is the median of the rounds' ratios.
        measured = [ingest_rate(s, args.ingest_items) for _ in range(rounds)]
        ours_rate = statistics.median(m[0] for m in measured)
        plain = statistics.median(m[1] for m in measured)
        ratio = statistics.median(m[0] / m[1] for m in measured)
        rows.append((f"ingest, {args.ingest_items} items (items/s)", f"{ours_rate:.0f}"))
        rows.append(("plain Core insert, batches of 100 (items/s)", f"{plain:.0f}"))
        rows.append(("ingest / plain insert", f"{ratio:.2f}  (goal >= 0.8)"))
    return rows


def ensure_workers(s: Stack, *names: str) -> None:
    """Start the named workers (region = name's prefix) not yet running; wait until ready."""
    for name in names:
        if name not in s.procs or s.procs[name][0].poll() is not None:
            s.worker(name.split("-")[0], name=name)
    wait_until(lambda: all("ready" in s.log(n) for n in names), timeout=300, what=", ".join(names))


def scrapy_ratio(
    s: Stack, workdir: Path, base: str, pages: int, rounds: int
) -> list[tuple[str, str]]:
    ensure_workers(s, "eu-1")
    bare = [timed(lambda: bare_scrapy(workdir, base)) for _ in range(rounds)]
    ours = [timed(lambda: crawl(s, "full")) for _ in range(rounds)]
    b, o = statistics.median(bare), statistics.median(ours)
    return [
        (f"bare scrapy, {pages} pages (s)", f"{b:.2f}  ({pages / b:.0f} pages/s)"),
        (f"geoscrape 1 worker, {pages} pages (s)", f"{o:.2f}  ({pages / o:.0f} pages/s)"),
        ("geoscrape / bare scrapy (pages/s)", f"{b / o:.2f}  (goal >= 0.95)"),
    ]


def distributed_ratio(s: Stack, rounds: int) -> list[tuple[str, str]]:
    ensure_workers(s, "eu-1")
    one = [timed(lambda: crawl(s, "shared")) for _ in range(rounds)]
    ensure_workers(s, "eu-1", "eu-2")
    two = [timed(lambda: crawl(s, "shared")) for _ in range(rounds)]
    s.stop("eu-2")
    d1, d2 = statistics.median(one), statistics.median(two)
    return [
        ("distributed, 1 worker (s)", f"{d1:.2f}"),
        ("distributed, 2 workers (s)", f"{d2:.2f}"),
        ("distributed 2 / 1 workers (pages/s)", f"{d1 / d2:.2f}  (goal >= 1.7)"),
    ]


def latency(s: Stack, jobs: int) -> list[tuple[str, str]]:
    ensure_workers(s, "eu-1")
    took = sorted(one_page_latency(s, jobs))
    p50 = statistics.median(took) * 1000
    p90 = took[int(0.9 * (len(took) - 1))] * 1000
    return [
        (
            f"one-page job, dispatch -> stored ({len(took)} jobs)",
            f"p50 {p50:.0f} ms, p90 {p90:.0f} ms  (goal p50 <= 50)",
        )
    ]


def shared_budget(s: Stack, log: Path) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    from storage.db import make_engine

    ensure_workers(s, "eu-1", "eu-2", "us-1", "us-2")
    since = time.time()
    for name in ("rate-a", "rate-b"):
        done = s.cli("crawl", name)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
    engine = make_engine(s.db_url)

    def rate_done() -> bool:
        with engine.connect() as c:
            n = c.execute(
                sa.text(
                    "SELECT count(*) FROM runs WHERE site LIKE 'rate-%' "
                    "AND status NOT IN ('queued', 'running')"
                )
            ).scalar()
        return n == 4

    wait_until(rate_done, timeout=3600, interval=1, what="the rate runs")
    engine.dispose()
    times = sorted(hits(log, since))
    steady = [t for t in times if times[0] + 2 <= t <= times[-1] - 2] or times
    rate = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    return [
        ("shared budget 20/s, 2 regions x 2 workers: requests/s", f"{rate:.1f}  (goal 18-22)"),
        ("shared budget: most requests in any 1 s window", f"{max_in_window(times)}  (goal <= 22)"),
    ]


if __name__ == "__main__":
    sys.exit(main())
