"""Politeness and scale through real processes: 2 regions x 2 `geoscrape worker`s + ingest.

One deployment for the module (starting six processes is the slow part): a
fresh vhost, a SQLite store, a Redis prefix of its own and short frontier
leases. The tests rewrite sites.yaml (the CLI reads it per command; jobs carry
their config). The last test kills one worker with SIGKILL.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import fresh_vhost
from tests.harness import Stack, stack, wait_until
from tests.pagesite import PageSite, max_in_window, serve_pages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKERS = ("eu-1", "eu-2", "us-1", "us-2")
HEADER = """\
regions:
  eu: {}
  us: {}
defaults:
  politeness: {delay: 0, concurrency: 2, robots: ignore}
  limits: {max_depth: 30, timeout: 5s}
  allow_hosts: ["127.0.0.1"]
sites:
"""


def site_yaml(name: str, url: str, regions: str, politeness: str = "{}", extra: str = "") -> str:
    return f"""\
  - name: {name}
    start_urls: ["{url}/p/0.html"]
    regions: [{regions}]
    follow: {{allow: ["/p/"]}}
    extract:
      key: id
      fields:
        id: {{css: ".id::text"}}
        title: {{css: "h1::text"}}
    politeness: {politeness}
{extra}"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import uuid

    import redis

    workdir = tmp_path_factory.mktemp("scale")
    prefix = f"geoscrape-test-{uuid.uuid4().hex[:10]}:"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEOSCRAPE_REDIS_PREFIX", prefix)
        patch.setenv("GEOSCRAPE_FRONTIER_LEASE", "3")
        with (
            fresh_vhost(f"geoscrape-test-{uuid.uuid4().hex[:10]}") as url,
            stack(workdir, url, f"sqlite:///{workdir}/store.db", HEADER + "  []\n") as s,
        ):
            from regions.bus import connect, declare_topology

            with connect(url) as conn:  # as dispatch would: workers declare nothing
                declare_topology(conn, ["eu", "us"])
            s.ingest()
            for name in WORKERS:
                s.worker(name.split("-")[0], name=name)

            def ready() -> bool:
                for name in WORKERS:
                    assert s.procs[name][0].poll() is None, f"{name} died:\n{s.log(name)}"
                return all("ready" in s.log(n) for n in WORKERS)

            wait_until(
                ready,
                timeout=120,
                what="four workers ready",
            )
            yield s
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def configure(s: Stack, *sites: str) -> None:
    s.config.write_text(HEADER + "".join(sites))


def finished_runs(s: Stack, site: str, count: int) -> list[Any]:
    from storage.queries import list_runs

    def done() -> list[Any] | None:
        with s.sessions()() as session:
            runs = list_runs(session, site=site, limit=100)
        final = [r for r in runs if r.status not in ("queued", "running")]
        return final if len(final) >= count else None

    return wait_until(done, timeout=240, interval=0.5, what=f"{count} finished run(s) of {site}")


def participant(s: Stack, run_id: str) -> str:
    """The eu worker that joined `run_id` as a participant, once one has."""

    def joined() -> str | None:
        for name in ("eu-1", "eu-2"):
            if f"run {run_id}: joining as a participant" in s.log(name):
                return name
        return None

    return wait_until(joined, timeout=120, what="a participant")


def observations(s: Stack, run_id: str) -> int:
    from storage.models import Observation

    with s.sessions()() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Observation).where(Observation.run_id == run_id)
            )
            or 0
        )


@pytest.mark.timing
def test_two_regions_two_workers_share_one_rate(deployment: Stack) -> None:
    s = deployment
    with serve_pages(PageSite(pages=20)) as site:
        polite = '{rate: "10/s", user_agent: "agent-%s"}'
        configure(
            s,
            site_yaml("rate-a", site.url, "eu, us", polite % "a"),
            site_yaml("rate-b", site.url, "eu, us", polite % "b"),
        )
        for name in ("rate-a", "rate-b"):
            done = s.cli("crawl", name)
            assert done.returncode == 0, done.stderr
        runs = finished_runs(s, "rate-a", 2) + finished_runs(s, "rate-b", 2)
        hits = site.page_hits()
    assert [r.status for r in runs] == ["succeeded"] * 4, [r.error for r in runs]
    assert len({r.worker for r in runs}) == 4  # every worker of both regions crawled
    assert len(hits) == 80
    assert max_in_window([h.at for h in site.snapshot()]) <= 11


def test_distributed_run_fetches_every_page_once_over_two_workers(deployment: Stack) -> None:
    s = deployment
    with serve_pages(PageSite(pages=60, delay=0.1)) as site:
        configure(s, site_yaml("shared", site.url, "eu", extra="    distributed: true\n"))
        done = s.cli("crawl", "shared")
        assert done.returncode == 0, done.stderr
        [run] = finished_runs(s, "shared", 1)
        hits = collections.Counter(h.path for h in site.page_hits())
    assert run.status == "succeeded", run.error
    assert hits == {f"/p/{n}.html": 1 for n in range(60)}
    helped = [
        int(m)
        for n in ("eu-1", "eu-2")
        for m in re.findall(rf"run {run.id}: took part, (\d+) pages", s.log(n))
    ]
    assert helped and sum(helped) > 0, "the second worker fetched nothing"
    assert run.stats["pages"] == 60 and run.stats["items"] == 60
    assert observations(s, run.id) == 60


def test_a_cancelled_distributed_run_stops_on_every_worker(deployment: Stack) -> None:
    """`geoscrape cancel`: the owner aborts and closes the run, the worker that joined
    it leaves, no worker joins it again; what was stored is kept."""
    from scraper.distributed import open_key
    from scraper.frontier import connect

    s = deployment
    pages = 300
    with serve_pages(PageSite(pages=pages, delay=0.25)) as site:
        configure(s, site_yaml("cancelled", site.url, "eu", extra="    distributed: true\n"))
        done = s.cli("crawl", "cancelled")
        assert done.returncode == 0, done.stderr
        run_id = re.findall(r"queued run (\S+)", done.stdout)[0]

        helper = participant(s, run_id)
        owner = next(n for n in ("eu-1", "eu-2") if n != helper)
        wait_until(lambda: len(site.page_hits()) >= 10, timeout=120, what="10 pages fetched")
        cancelled = s.cli("cancel", run_id)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        wait_until(
            lambda: (
                f"run {run_id}: cancelled;" in s.log(owner)
                and f"run {run_id}: cancelled; left it" in s.log(helper)
            ),
            timeout=60,
            what="both workers to stop crawling the run",
        )
        [run] = finished_runs(s, "cancelled", 1)
        fetched = len(site.page_hits())
    assert run.status == "cancelled", run.error
    assert fetched < pages  # cut short
    assert observations(s, run.id) >= 10  # what was stored is kept
    assert run_id not in {str(m) for m in connect().smembers(open_key("eu"))}


def test_distributed_run_survives_a_worker_killed_mid_crawl(deployment: Stack) -> None:
    s = deployment
    with serve_pages(PageSite(pages=80, delay=0.25)) as site:
        configure(s, site_yaml("killed", site.url, "eu", extra="    distributed: true\n"))
        done = s.cli("crawl", "killed")
        assert done.returncode == 0, done.stderr
        run_id = re.findall(r"queued run (\S+)", done.stdout)[0]

        victim = participant(s, run_id)
        wait_until(lambda: len(site.page_hits()) >= 20, timeout=120, what="20 pages fetched")
        proc = s.procs[victim][0]
        proc.kill()  # SIGKILL: its crawl child dies with it (PR_SET_PDEATHSIG)
        proc.wait()
        [run] = finished_runs(s, "killed", 1)
        hits = collections.Counter(h.path for h in site.page_hits())
    assert run.status == "succeeded", run.error
    assert set(hits) == {f"/p/{n}.html" for n in range(80)}  # no page missing
    assert observations(s, run.id) == 80  # every item once
    assert run.stats["items"] >= 1
