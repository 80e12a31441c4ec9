"""`geoscrape demo --no-ui`, as CI and a new user run it: real regional differences, isolated.

The demo runs as a real process on the broker's default vhost URL while an
unrelated consumer (started here) sits on the default vhost's queues holding
whatever it gets: the demo must not care, because it runs on its own vhost.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Message

from geoscrape.demo import DEMO_REGIONS, demo_config
from regions.bus import INGEST_QUEUE, declare_topology, queue_depth, scrape_queue
from scheduler.loader import load_config

pytestmark = pytest.mark.slow

DEFAULT_VHOST = "amqp://guest:guest@127.0.0.1:5672//"


@contextmanager
def greedy_consumer(url: str, regions: list[str]) -> Iterator[Connection]:
    """A consumer on every demo queue of `url` that takes one message each and never acks.

    Held messages go back to their queue when the connection closes, so
    nothing of whoever else uses that vhost is lost.
    """
    held: list[Message] = []
    with Connection(url) as conn:
        declare_topology(conn, regions)
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        queues = [scrape_queue(r) for r in regions] + [INGEST_QUEUE]
        with Consumer(channel, queues=queues, callbacks=[lambda _b, m: held.append(m)]):
            yield conn


def test_demo_shows_regional_prices_and_a_geo_block_on_its_own_vhost(tmp_path: Path) -> None:
    regions = [r.name for r in DEMO_REGIONS]
    with greedy_consumer(DEFAULT_VHOST, regions) as conn:
        for region in regions:
            depth = queue_depth(conn, f"scrape.{region}")
            assert depth is not None and depth[1] >= 1, f"no unrelated consumer on {region}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "geoscrape.cli",
                "demo",
                "--no-ui",
                "--products",
                "8",
                "--keep",
                str(tmp_path / "demo"),
            ],
            env={**os.environ, "GEOSCRAPE_BROKER_URL": DEFAULT_VHOST, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=600,  # a hang fails the test; the demo itself has no time limit
        )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text

    vhost = re.search(r"broker vhost (geoscrape-demo-[0-9a-f]+)", text)
    assert vhost, text
    vhosts = subprocess.run(
        ["rabbitmqctl", "list_vhosts"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert vhost.group(1) not in vhosts, "the demo left its vhost behind"

    # compare --only-diff: every product differs in price and currency, EUR vs USD.
    assert "compare (only-diff)" in text or "compare" in text
    assert re.search(r"\bEUR\b", text) and re.search(r"\bUSD\b", text), text
    assert "8 keys" in text, text
    # The access matrix: asia is geo-blocked, eu and us ok.
    assert re.search(r"^asia: geo-blocked: HTTP 451 here", text, re.M), text
    assert re.search(r"^eu: ok", text, re.M) and re.search(r"^us: ok", text, re.M), text

    # The shop saw each region from its own loopback address (also in the kept log).
    for region in DEMO_REGIONS:
        assert re.search(
            rf"{re.escape(region.source_address)} \({region.name}\): [1-9]\d* requests", text
        ), text
    log = (tmp_path / "demo" / "shop-access.log").read_text().splitlines()
    clients = {line.split()[0] for line in log}
    assert clients == {r.source_address for r in DEMO_REGIONS}, clients
    blocked = [line for line in log if line.startswith("127.0.0.13 ")]
    assert blocked and all(" /index.html" in b or " /robots.txt" in b for b in blocked), blocked


def test_demo_config_gives_each_region_its_source_address(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(demo_config("127.0.0.1:1", "http://127.0.0.1:1"))
    config = load_config(path)
    assert {name: config.region(name).egress.source_address for name in config.regions} == {
        r.name: r.source_address for r in DEMO_REGIONS
    }
