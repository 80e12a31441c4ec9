"""Warm crawl processes (scraper/forkserver.py, scraper/warm.py).

Crawls forked from the fork server behave as fresh `python -m scraper.child`
processes: both engines, one after another in the same server, a crash, a dead
server. The last test runs 500 one-page jobs through a real worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from regions.messages import Job, RunFinished
from scheduler.config import Config
from scraper import runner
from scraper.warm import WarmChild
from tests.conftest import fresh_vhost
from tests.harness import stack, wait_until
from tests.pagesite import PageSite, serve_pages


def one_page(url: str, engine: str = "requests", **extra: Any) -> dict[str, Any]:
    config = Config.model_validate(
        {
            "regions": {"eu": {}},
            "defaults": {"allow_hosts": ["127.0.0.1"]},
            "sites": [
                {
                    "name": "one",
                    "regions": ["eu"],
                    "engine": engine,
                    "start_urls": [f"{url}/p/0.html"],
                    "extract": {"key": "id", "fields": {"id": {"css": ".id::text"}}},
                    "politeness": {"delay": 0, "robots": "ignore"},
                    **extra,
                }
            ],
        }
    )
    return config.resolved_site("one").model_dump(mode="json")


def crawl(config: dict[str, Any]) -> tuple[RunFinished, list[BaseModel]]:
    out: list[BaseModel] = []
    job = Job(run_id=str(uuid.uuid4()), site="one", region="eu", config=config)
    return runner.run_job(job, out.append, worker="test", timeout=120), out


@pytest.fixture
def warm() -> Iterator[runner.WarmChildren]:
    server = runner.start_warm_children()
    try:
        yield server
    finally:
        runner.stop_warm_children()


@pytest.fixture(scope="module")
def site() -> Iterator[PageSite]:
    with serve_pages(PageSite(pages=3)) as served:
        yield served


def test_both_engines_run_forked_one_after_another(
    warm: runner.WarmChildren, site: PageSite
) -> None:
    forks: list[int] = []
    original = warm.spawn

    def spawn() -> WarmChild:
        child = original()
        forks.append(child.pid)
        return child

    warm.spawn = spawn  # type: ignore[method-assign]
    for engine in ("requests", "scrapy", "scrapy", "requests"):
        finished, _ = crawl(one_page(site.url, engine))
        assert finished.status == "succeeded", finished.error
        assert finished.stats.items == 1
    assert len(set(forks)) == 4 and warm.proc.pid not in forks  # a fresh fork per crawl
    assert warm.proc.poll() is None


def test_a_crashing_fork_is_reported_like_a_crashing_child(
    warm: runner.WarmChildren, site: PageSite
) -> None:
    finished, _ = crawl(one_page(site.url, "scrapy", spider="no.such.module:Spider"))
    assert finished.status == "failed"
    assert "cannot load spider" in (finished.error or "")
    assert warm.proc.poll() is None


def test_a_running_fork_polls_as_running_and_is_killed(warm: runner.WarmChildren) -> None:
    # Regression: poll() read "no data yet" as "the server hung up" and
    # answered -9 for a live fork, so the runner's kill skipped it (an aborted
    # crawl ran on for seconds after the second Ctrl-C).
    child = warm.spawn()  # waits for its job on stdin: running until killed
    try:
        assert child.poll() is None
        assert child.poll() is None  # asking twice changes nothing
        assert Path(f"/proc/{child.pid}").exists()
        runner._kill(child)
        assert child.returncode == -signal.SIGKILL
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    wait_until(lambda: not Path(f"/proc/{child.pid}").exists(), timeout=10, what="the fork reaped")


def test_the_fork_server_fills_what_every_crawl_would_fill_itself() -> None:
    # Each fork inherits these: parsing and compiling them per crawl was most of a
    # one-page crawl's own time.
    check = """
import sys
from regions import settings as s
from scraper import blocks, forkserver
forkserver.preload()
assert blocks.builtin.cache_info().currsize == 1
assert blocks._body_pattern.cache_info().currsize > 0
assert s._build.cache_info().currsize == 1
assert "scraper.runner" in sys.modules and "netrc" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_dead_fork_server_falls_back_to_a_fresh_process(
    warm: runner.WarmChildren, site: PageSite
) -> None:
    os.kill(warm.proc.pid, signal.SIGKILL)  # our own fork server
    warm.proc.wait()
    finished, _ = crawl(one_page(site.url))
    assert finished.status == "succeeded", finished.error


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 500 crawls: minutes on a loaded 2-core machine
def test_worker_rss_is_flat_over_500_one_page_jobs(tmp_path: Path, site: PageSite) -> None:
    from scheduler.dispatch import publish_jobs
    from storage.queries import list_runs

    yaml = f"""\
regions: {{eu: {{}}}}
defaults: {{allow_hosts: ["127.0.0.1"]}}
sites:
  - name: one
    engine: requests
    start_urls: ["{site.url}/p/0.html"]
    regions: [eu]
    politeness: {{delay: 0, robots: ignore}}
    extract: {{key: id, fields: {{id: {{css: ".id::text"}}}}}}
"""
    config = one_page(site.url)
    with (
        fresh_vhost(f"geoscrape-test-{uuid.uuid4().hex[:10]}") as url,
        stack(tmp_path, url, f"sqlite:///{tmp_path}/store.db", yaml) as s,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("GEOSCRAPE_BROKER_URL", url)

        def dispatch(n: int) -> None:
            jobs = [
                Job(run_id=str(uuid.uuid4()), site="one", region="eu", config=config)
                for _ in range(n)
            ]
            publish_jobs(jobs)

        def succeeded(n: int) -> bool:
            with s.sessions()() as session:
                runs = list_runs(session, site="one", limit=1000)
            assert not [r for r in runs if r.status == "failed"], runs[0].error
            return sum(r.status == "succeeded" for r in runs) >= n

        from storage.migrate import ensure_schema

        ensure_schema(s.db_url)
        s.ingest()
        worker = s.worker("eu")
        dispatch(50)
        wait_until(lambda: succeeded(50), timeout=300, interval=0.5, what="50 jobs")
        after_50 = rss(worker.pid)
        dispatch(450)
        wait_until(lambda: succeeded(500), timeout=900, interval=1, what="500 jobs")
        after_500 = rss(worker.pid)
        assert worker.poll() is None
    print(f"\nworker RSS after 50 jobs {after_50 >> 20} MiB, after 500 {after_500 >> 20} MiB")
    assert after_500 <= after_50 * 1.10
