"""Query benchmark: 1,000,000 observations over 3 regions in a fresh PostgreSQL database.

    make bench                          # or: .venv/bin/python -m bench.query_bench
    python -m bench.query_bench --observations 100000 --reps 10

Loads the store through the real writer (storage.writer.apply_message, one
ItemBatch per run), then reports p50/p95 latency of compare, history and
changes (query layer) and of the HTTP API's list endpoints (a real uvicorn
process), then the same queries again without the 0004 indexes (the
baseline, same data, same run) and the ratio. Exports 1M observations to
each format in a child process and reports its peak RSS against a 100k-row
export. The database is created at the start and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import requests

from regions.messages import ItemBatch, RunFinished, RunQueued, RunStats, ScrapedItem
from storage.compare import compare
from storage.db import make_engine, session_factory
from storage.history import changes, history
from storage.migrate import ensure_schema
from storage.writer import apply_message

ADMIN = os.environ.get("GEOSCRAPE_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REGIONS = ("eu", "us", "asia")
KEYS = 2000
T0 = datetime(2024, 1, 1, tzinfo=UTC)
INDEXES = {  # the 0004 query indexes: dropped for the baseline
    "ix_observations_site_key": "observations (site, key)",
    "ix_observations_site_observed_at": "observations (site, observed_at)",
    "ix_runs_site_status_finished_at": "runs (site, status, finished_at)",
    "ix_runs_site_tick": "runs (site, tick)",
}
CONFIG = {
    "name": "bench",
    "extract": {
        "key": "sku",
        "fields": {
            "sku": {"css": "::attr(data-sku)", "type": "str"},
            "name": {"css": ".name::text", "type": "str"},
            "price": {"css": ".price::text", "type": "price"},
        },
    },
}


def price(key: int, region: str, run: int) -> float:
    """Stable prices; 2% of keys change every 10th run; us is 10% dearer."""
    step = run // 10 if key % 50 == 0 else 0
    return round((key % 900 + 1) * (1.1 if region == "us" else 1.0) + step, 2)


def load(url: str, observations: int) -> tuple[int, float]:
    per_round = KEYS * len(REGIONS) - KEYS // 100  # asia misses 1% of the keys
    runs_per_region = max(1, -(-observations // per_round))  # at least `observations`
    factory = session_factory(make_engine(url))
    started = time.perf_counter()
    for run in range(runs_per_region):
        at = T0 + timedelta(hours=run)
        for region in REGIONS:
            rid = f"r{run:04d}-{region}"
            keys = [k for k in range(KEYS) if not (region == "asia" and k % 100 == 7)]
            msgs: list[RunQueued | ItemBatch | RunFinished] = [
                RunQueued(run_id=rid, site="bench", region=region, tick=f"t{run:04d}",
                          queued_at=at, job={"config": CONFIG}),
                ItemBatch(run_id=rid, site="bench", region=region, seq=0, observed_at=at,
                          items=[ScrapedItem(key=f"K{k:05d}", url=f"https://b.example/{k}",
                                             data={"sku": f"K{k:05d}", "name": f"Item {k}",
                                                   "price": price(k, region, run)})
                                 for k in keys]),
                RunFinished(run_id=rid, site="bench", region=region, status="succeeded",
                            finished_at=at + timedelta(minutes=5), stats=RunStats(items=len(keys))),
            ]  # fmt: skip
            with factory.begin() as session:
                for msg in msgs:
                    apply_message(session, msg)
        if run % 20 == 0:
            print(f"  loaded {run + 1}/{runs_per_region} runs per region", flush=True)
    return runs_per_region, time.perf_counter() - started


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    fn()  # warm up (plans, caches)
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return statistics.median(samples), p95


def measure(url: str, base: str, runs: int, reps: int) -> dict[str, tuple[float, float]]:
    factory = session_factory(make_engine(url))
    rng = random.Random(7)
    mid = f"t{runs // 2:04d}"
    since = T0 + timedelta(hours=runs - 5)

    def q(fn: Callable[[Any], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with factory() as session:
                return fn(session)

        return run

    def api(path: str, **params: Any) -> Callable[[], Any]:
        def run() -> Any:
            r = requests.get(base + path, params=params, timeout=120)
            r.raise_for_status()
            return r.json()

        return run

    key = lambda: f"K{rng.randrange(KEYS):05d}"  # noqa: E731
    return {
        "compare --latest (2000 keys x 3 regions)": timed(q(lambda s: compare(s, "bench")), reps),
        "compare --run-tick (middle tick)": timed(q(lambda s: compare(s, "bench", tick=mid)), reps),
        "history KEY (all regions)": timed(q(lambda s: history(s, "bench", key())), reps),
        "changes --since (last 5 runs)": timed(q(lambda s: changes(s, "bench", since)), reps),
        "API GET /sites": timed(api("/sites"), reps),
        "API GET /runs?site&limit=100": timed(api("/runs", site="bench", limit=100), reps),
        "API GET /runs?region&status&since": timed(
            api("/runs", region="us", status="succeeded", since=since.isoformat()), reps
        ),
        "API GET /sites/bench/items?offset=3000": timed(
            api("/sites/bench/items", limit=100, offset=3000), reps
        ),
        "API GET /sites/bench/compare?limit=100": timed(
            api("/sites/bench/compare", limit=100), reps
        ),
        "API GET /sites/bench/history?key": timed(
            lambda: api("/sites/bench/history", key=key())(), reps
        ),
    }


def start_api(url: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GEOSCRAPE_DATABASE_URL": url}
    env.pop("GEOSCRAPE_API_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoscrape.cli", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(base + "/health", timeout=1).ok:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the API did not start")


def export_peak(url: str, fmt: str, out: Path, *extra: str) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, rows) of `geoscrape export` in a child process."""
    env = {**os.environ, "GEOSCRAPE_DATABASE_URL": url}
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoscrape.cli", "export", "bench", "-k", "observations",
         "-f", fmt, "-o", str(out), *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"export failed: {stderr}")
    rows = int(stderr.split()[1])
    return usage.ru_maxrss / 1024, took, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    name = f"geoscrape_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    api_proc = None
    try:
        ensure_schema(url)
        print(f"database {name}: loading ~{args.observations:,} observations", flush=True)
        runs, took = load(url, args.observations)
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            obs = conn.execute("SELECT count(*) FROM observations").fetchone()[0]  # type: ignore[index]
            distinct = conn.execute("SELECT count(*) FROM contents").fetchone()[0]  # type: ignore[index]
            conn.execute("ANALYZE")
            size = conn.execute(
                "SELECT pg_total_relation_size('observations'), pg_total_relation_size('contents')"
            ).fetchone()
        print(f"loaded {obs:,} observations ({runs} runs x {len(REGIONS)} regions) through the "
              f"writer in {took:.0f}s ({obs / took:,.0f}/s); {distinct:,} distinct contents; "
              f"observations {size[0] / 2**20:.0f} MiB, contents {size[1] / 2**20:.1f} MiB")  # type: ignore[index]  # fmt: skip

        api_proc, base = start_api(url)
        indexed = measure(url, base, runs, args.reps)
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            for index in INDEXES:
                conn.execute(f"DROP INDEX {index}")
            conn.execute("ANALYZE")
        baseline = measure(url, base, runs, max(3, args.reps // 4))
        print(f"\nlatency in ms, {args.reps} reps (baseline: same data without the 0004 indexes "
              f"{', '.join(INDEXES.values())})")  # fmt: skip
        print(f"{'query':44} {'p50':>9} {'p95':>9} | {'base p50':>9} {'base p95':>9} | speed-up")
        for label, (p50, p95) in indexed.items():
            b50, b95 = baseline[label]
            print(f"{label:44} {p50:9.1f} {p95:9.1f} | {b50:9.1f} {b95:9.1f} | {b50 / p50:6.1f}x")

        print("\nexport of observations, peak RSS of the `geoscrape export` process")
        head = f"{'format':8} {'rows':>10} {'peak MiB':>9} {'secs':>6} | {'rows':>8} {'MiB':>9}"
        print(head + " | ratio")
        recent = (T0 + timedelta(hours=runs - max(1, runs // 10))).isoformat()
        with __import__("tempfile").TemporaryDirectory() as tmp:
            for fmt in ("csv", "jsonl", "parquet"):
                big = export_peak(url, fmt, Path(tmp) / f"all.{fmt}")
                small = export_peak(url, fmt, Path(tmp) / f"recent.{fmt}", "--since", recent)
                print(f"{fmt:8} {big[2]:10,} {big[0]:9.0f} {big[1]:6.1f} | {small[2]:8,} "
                      f"{small[0]:9.0f} | {big[0] / small[0]:.2f}")  # fmt: skip
    finally:
        if api_proc is not None:
            api_proc.terminate()
            api_proc.wait(timeout=20)
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"dropped {name}")


if __name__ == "__main__":
    main()
