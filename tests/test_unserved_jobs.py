"""Jobs nobody serves: `crawl --wait` says so at once, and a manual job expires.

Real `geoscrape ingest` and CLI processes on a fresh vhost and store; no
worker at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.models import runs
from tests.harness import stack, wait_until

pytestmark = pytest.mark.slow

CONFIG = """\
regions:
  eu: {}
sites:
  - name: shop
    start_urls: ["http://127.0.0.1:1/"]
    regions: [eu]
    allow_hosts: ["127.0.0.1:1"]
    extract: {fields: {t: {css: h1}}}
"""


def test_a_manual_job_nobody_serves_expires(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        s.ingest()
        started = time.monotonic()
        done = s.cli("crawl", "shop", "--wait", "--expires", "5s")
        took = time.monotonic() - started
        assert done.returncode == 2, done.stdout + done.stderr
        assert (
            "no worker is consuming scrape.eu: start 'geoscrape worker --region eu'" in done.stderr
        )
        # After --expires (the job cannot start later), not the 60 s grace or --timeout.
        assert 5 <= took < 45, took
        assert "(expires in 5s)" in done.stdout

        def status() -> str | None:
            with s.sessions()() as session:
                return session.execute(select(runs.c.status)).scalar_one_or_none()

        wait_until(lambda: status() == "expired", timeout=120, what="the run to expire")
        with s.sessions()() as session:
            error = session.execute(select(runs.c.error)).scalar_one()
        assert "no worker in region 'eu' started it" in error


def test_bad_expires_is_one_line(tmp_path: Path, vhost_url: str, sqlite_url: str) -> None:
    with stack(tmp_path, vhost_url, sqlite_url, CONFIG) as s:
        done = s.cli("crawl", "shop", "--expires", "soon")
        assert done.returncode == 2
        assert done.stderr.strip().startswith("error: --expires: not a duration: 'soon'")
