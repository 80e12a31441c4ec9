"""A store with known observations for the query tests (compare, access, history, changes, API).

Site ``shop``, regions eu, us, asia, two ticks a day apart, written through
the real writer (storage.writer.apply_message):

- t1 (day 0): eu and us see A=10, B=20, C=30; asia gets 451 and a captcha page.
- t2 (day 1): eu sees the same again; us sees A=10, B=25 (price differs from
  eu), no C (missing in us, vanished from us); asia is blocked again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from regions.messages import (
    Fetch,
    ItemBatch,
    Job,
    RunFinished,
    RunQueued,
    RunStarted,
    RunStats,
    ScrapedItem,
)
from storage.db import make_engine, session_factory
from storage.migrate import ensure_schema
from storage.writer import apply_message
from tests.sites import resolved_site

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PRICES = "https://shop.example/prices"
PAGE_B = "https://shop.example/p/B"
CAPTCHA = "https://shop.example/captcha?from=/p/B"
NAMES = {"A": "Alpha", "B": "Beta", "C": "Gamma"}
CONFIG = resolved_site(
    "shop",
    start_urls=[PRICES, PAGE_B],
    extract={
        "items": "div.product",
        "key": "sku",
        "fields": {
            "sku": {"css": "::attr(data-sku)", "type": "str"},
            "name": {"css": ".name::text", "type": "str"},
            "price": {"css": ".price::text", "type": "price"},
        },
    },
    # Never sent (every run here succeeds); shows the key `from`, not `sender`, in runs show.
    alerts={
        "email": {"smtp": "127.0.0.1:2525", "from": "gs@shop.example", "to": ["ops@x.example"]}
    },
)
# (tick, day) -> region -> prices seen (None: blocked)
SEEN: dict[tuple[str, int], dict[str, dict[str, float] | None]] = {
    ("t1", 0): {"eu": {"A": 10.0, "B": 20.0, "C": 30.0}, "us": {"A": 10.0, "B": 20.0, "C": 30.0},
                "asia": None},
    ("t2", 1): {"eu": {"A": 10.0, "B": 20.0, "C": 30.0}, "us": {"A": 10.0, "B": 25.0},
                "asia": None},
}  # fmt: skip


def run_id(tick: str, region: str) -> str:
    return f"{tick}-{region}"


def data(key: str, price: float) -> dict[str, Any]:
    return {"sku": key, "name": NAMES[key], "price": price}


def messages() -> list[Any]:
    out: list[Any] = []
    for (tick, day), regions in SEEN.items():
        base = T0 + day * DAY
        for region, prices in regions.items():
            rid = run_id(tick, region)
            job = Job(run_id=rid, site="shop", region=region, dispatched_at=base, config=CONFIG)
            fetched = (
                [Fetch(url=PRICES, status=200, bytes=900), Fetch(url=PAGE_B, status=200, bytes=400)]
                if prices is not None
                else [
                    Fetch(url=PRICES, status=451, bytes=120),
                    Fetch(url=PAGE_B, status=200, bytes=300, final_url=CAPTCHA),
                ]
            )
            items = [
                ScrapedItem(key=k, url=f"https://shop.example/p/{k}", data=data(k, p))
                for k, p in (prices or {}).items()
            ]
            out += [
                RunQueued(run_id=rid, site="shop", region=region, trigger="schedule", tick=tick,
                          queued_at=base, job=job),
                RunStarted(run_id=rid, site="shop", region=region, worker=f"w-{region}",
                           started_at=base + timedelta(minutes=1)),
                ItemBatch(run_id=rid, site="shop", region=region, seq=0,
                          observed_at=base + timedelta(minutes=2), items=items, fetches=fetched),
                RunFinished(run_id=rid, site="shop", region=region, status="succeeded",
                            finished_at=base + timedelta(minutes=3),
                            stats=RunStats(pages=2, items=len(items))),
            ]  # fmt: skip
    return out


def build_store(url: str) -> None:
    """Apply every message, each in its own transaction, twice (redelivery changes nothing)."""
    ensure_schema(url)
    engine = make_engine(url)
    try:
        factory = session_factory(engine)
        for msg in messages() + messages():
            with factory.begin() as session:
                apply_message(session, msg)
    finally:
        engine.dispose()


def cli_env(url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "GEOSCRAPE_DATABASE_URL": url, "PYTHONUNBUFFERED": "1", **extra}


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", *args],
        env=cli_env(url),
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_json(url: str, *args: str) -> Any:
    done = cli(url, *args, "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_server(url: str, token: str | None = None) -> Iterator[str]:
    """A real `geoscrape api` process (uvicorn) on a free port; yields its base URL."""
    port = free_port()
    extra = {"GEOSCRAPE_API_TOKEN": token} if token else {}
    env = cli_env(url, **extra)
    if not token:
        env.pop("GEOSCRAPE_API_TOKEN", None)
    # The log goes to a file: a pipe nobody drains fills up after ~64 KB of
    # access-log lines and then blocks the server mid-request.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoscrape.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                output = log.read()
                raise AssertionError(f"the API did not come up on {base}:\n{output}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
