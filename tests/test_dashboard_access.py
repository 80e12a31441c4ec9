"""Dashboard access rules and errors over a real `geoscrape api` process, without a browser;
and the demo's observed-state hints against a real broker."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from rich.console import Console

from geoscrape.demo import Child, DemoError, _observed, wait_for_demo_runs
from regions.bus import connect, declare_topology
from storage.migrate import upgrade
from tests.query_store import api_server, build_store


def test_pages_and_metrics_need_the_read_token_when_one_is_set(sqlite_url: str) -> None:
    build_store(sqlite_url)
    with api_server(sqlite_url, token="s3cret") as base:
        refused = requests.get(f"{base}/", timeout=30)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert requests.get(f"{base}/metrics", timeout=30).status_code == 401
        browser = requests.Session()
        first = browser.get(f"{base}/?token=s3cret", timeout=30)
        assert first.status_code == 200 and "<h1>Overview</h1>" in first.text
        # The cookie set by ?token= lets the next pages in without the token.
        site = browser.get(f"{base}/ui/sites/shop", timeout=30)
        assert site.status_code == 200 and 'id="compare"' in site.text
        bearer = {"Authorization": "Bearer s3cret"}
        metrics = requests.get(f"{base}/metrics", headers=bearer, timeout=30)
        assert metrics.status_code == 200 and "geoscrape_runs_total" in metrics.text


def test_unknown_site_and_run_are_404s_and_requeue_is_refused(sqlite_url: str) -> None:
    build_store(sqlite_url)
    with api_server(sqlite_url) as base:
        site = requests.get(f"{base}/ui/sites/nosuch", timeout=30)
        assert site.status_code == 404 and "nosuch" in site.json()["error"]
        run = requests.get(f"{base}/ui/runs/nosuch", timeout=30)
        assert run.status_code == 404 and "No run nosuch in the store" in run.text
        requeue = requests.post(
            f"{base}/ui/dead/anything/requeue", data={"write_token": "x"}, timeout=30
        )
        assert requeue.status_code == 403
        assert requeue.json()["error"].startswith("requeue is disabled")
        assert "Requeue" not in requests.get(f"{base}/ui/dead", timeout=30).text


def test_run_page_and_metrics_read_through_the_query_layer(sqlite_url: str) -> None:
    """The run page (storage.runinfo.run_page) and /metrics (storage.queries.store_counts)
    show what the store holds; test_dashboard.py checks them in a browser too."""
    build_store(sqlite_url)
    with api_server(sqlite_url) as base:
        page = requests.get(f"{base}/ui/runs/t1-asia", timeout=30)
        assert page.status_code == 200, page.text
        assert '<p id="codes">200x1 451x1 </p>' in page.text
        failed = page.text.split('<table id="failed">')[1].split("</table>")[0]
        assert failed.count("<tr><td>") == 1  # the 451, not the 200 that ended on a captcha
        assert "<td>https://shop.example/prices</td><td>451</td>" in failed
        assert "&#34;dispatched_at&#34;" in page.text  # the job as dispatched
        # A unique prefix finds the run (as `runs show` does); an ambiguous one is a 404 page.
        assert "Run t1-asia" in requests.get(f"{base}/ui/runs/t1-a", timeout=30).text
        assert requests.get(f"{base}/ui/runs/t1", timeout=30).status_code == 404

        metrics = requests.get(f"{base}/metrics", timeout=30).text
        for line in (
            'geoscrape_runs_total{region="eu",site="shop",status="succeeded"} 2.0',
            'geoscrape_pages_total{region="asia"} 4.0',
            'geoscrape_items_total{region="eu"} 6.0',
            'geoscrape_items_total{region="us"} 5.0',
        ):
            assert line in metrics.splitlines(), metrics


def test_demo_hint_says_what_it_observes(vhost_url: str) -> None:
    with connect(vhost_url) as conn:
        declare_topology(conn, ["eu"])
    lines = _observed(vhost_url, ["eu", "nowhere"], {})
    assert (
        lines[0] == "  eu: queue scrape.eu: 0 job(s) ready, 0 consumer(s); worker-eu: not started"
    )
    assert lines[1].startswith("  nowhere: queue scrape.nowhere: does not exist")


def test_demo_wait_ends_with_the_log_of_a_child_that_exited(
    tmp_path: Path, sqlite_url: str, vhost_url: str
) -> None:
    upgrade(sqlite_url)
    log = tmp_path / "worker-eu.log"
    log.write_text("boom: the worker could not start\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=60)
    out = io.StringIO()
    with pytest.raises(DemoError, match="worker-eu exited before the runs ended"):
        wait_for_demo_runs(
            Console(file=out),
            sqlite_url,
            vhost_url,
            ["r1"],
            {"worker-eu": Child("worker-eu", proc, log)},
        )
    assert "worker-eu exited 3" in out.getvalue() and "boom" in out.getvalue()
