"""`geoscrape beat` as real processes against real Redis and RabbitMQ (a vhost per test).

Without workers, every dispatched job ends up either still in its region
queue or, once its deadline (the next tick) passed, dead-lettered to
`scrape.dead`: draining both counts exactly the jobs the beats published,
doubles included (the store would collapse a double into one run).
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection

from regions.bus import declare_topology, queue_depth
from tests.harness import Stack, stack, wait_until

# timing: these tests bound when a tick fires, fails over or reaches the store
# (within 1.5 s, 10 s, 3 s...); two CI runs with 4 test workers and image builds
# on 2 cores each broke a different one, so `make test` runs them alone.
pytestmark = [pytest.mark.slow, pytest.mark.timing]

HEADER = """\
regions:
  eu: {}
  us: {}
sites:
"""

SITE = """\
  - name: {name}
    start_urls: ["http://127.0.0.1:9/"]
    regions: [{regions}]
    schedule: {schedule}
    extract: {{fields: {{title: {{css: "title::text"}}}}}}
"""

ACTIVE = "active (took the lease)"


def site(name: str, schedule: str, regions: str = "eu, us") -> str:
    return SITE.format(name=name, schedule=schedule, regions=regions)


@dataclass(frozen=True)
class SentJob:
    queue: str
    region: str
    site: str
    tick: str
    run_id: str
    dispatched_at: datetime

    @property
    def tick_time(self) -> float:
        return datetime.fromisoformat(self.tick.split("@", 1)[1].replace("Z", "+00:00")).timestamp()


def drain_jobs(url: str, regions: tuple[str, ...] = ("eu", "us")) -> list[SentJob]:
    """Every job message in the region queues and in scrape.dead, consumed."""
    jobs = []
    with Connection(url) as conn:
        channel = conn.default_channel
        for queue in [*(f"scrape.{r}" for r in regions), "scrape.dead"]:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                job = json.loads(message.body)[0][0]
                jobs.append(
                    SentJob(
                        queue=queue,
                        region=job["region"],
                        site=job["site"],
                        tick=job["tick"],
                        run_id=job["run_id"],
                        dispatched_at=datetime.fromisoformat(job["dispatched_at"]),
                    )
                )
    return jobs


def even_ticks(start: float, end: float, every: float) -> int:
    """Multiples of `every` in (start, end]."""
    return int(end // every) - int(start // every)


def assert_exact_series(jobs: list[SentJob], site_name: str, every: float) -> list[float]:
    """Each tick once per region, the same ticks in every region, none missing between."""
    mine = [j for j in jobs if j.site == site_name]
    per_region_tick = Counter((j.region, j.tick) for j in mine)
    doubled = {k: n for k, n in per_region_tick.items() if n != 1}
    assert not doubled, f"ticks dispatched more than once: {doubled}"
    by_region = {r: sorted(j.tick_time for j in mine if j.region == r) for r in ("eu", "us")}
    assert by_region["eu"] == by_region["us"]
    ticks = by_region["eu"]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(ticks)]
    assert set(gaps) <= {every}, f"ticks missing: gaps {gaps}"
    return ticks


def wait_active(s: Stack, names: list[str], timeout: float = 60) -> str:
    def active() -> str | None:
        for name in names:
            if ACTIVE in s.log(name):
                return name
        return None

    return wait_until(active, timeout=timeout, what="a beat to become active")


def active_beat(s: Stack, redis_prefix: str, names: list[str]) -> str:
    import redis

    holder = redis.Redis(decode_responses=True).get(f"{redis_prefix}beat:lease")
    assert holder is not None
    pid = int(holder.split(":")[1])
    [name] = [n for n in names if s.procs[n][0].pid == pid]
    return name


def test_one_beat_fires_each_tick_once_per_region(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    config = HEADER + site("fast", "{every: 2s, overlap: queue}")
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        s.start("beat", "beat")
        wait_active(s, ["beat"])
        started = time.time()
        time.sleep(20)
        stopped = time.time()  # ticks after this may or may not be fired
        s.stop("beat")
        jobs = drain_jobs(vhost_url)
    ticks = assert_exact_series(jobs, "fast", 2.0)
    expected = even_ticks(started, stopped, 2.0)
    print(f"\none beat, 20 s at 2 s, regions eu+us: {len(ticks)} ticks (expected {expected})")
    assert abs(len(ticks) - expected) <= 1
    assert len(jobs) == 2 * len(ticks)
    assert all(j.dispatched_at.timestamp() - j.tick_time < 1.5 for j in jobs)


def test_three_beats_fire_each_tick_once(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    config = HEADER + site("fast", "{every: 2s, overlap: queue}")
    names = ["beat-1", "beat-2", "beat-3"]
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        for name in names:
            s.start(name, "beat")
        wait_active(s, names)
        started = time.time()
        time.sleep(20)
        stopped = time.time()  # ticks after this may or may not be fired
        s.stop(*names)
        jobs = drain_jobs(vhost_url)
        actives = [n for n in names if ACTIVE in s.log(n)]
    ticks = assert_exact_series(jobs, "fast", 2.0)
    expected = even_ticks(started, stopped, 2.0)
    print(
        f"\nthree beats, 20 s at 2 s: {len(ticks)} ticks (expected {expected}), active: {actives}"
    )
    assert len(actives) == 1
    assert abs(len(ticks) - expected) <= 1
    assert len(jobs) == 2 * len(ticks)


def test_kill_9_of_the_active_beat_loses_and_doubles_no_tick(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    config = HEADER + site("fast", "{every: 2s, overlap: queue}")
    names = ["beat-1", "beat-2", "beat-3"]
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        for name in names:
            s.start(name, "beat")
        wait_active(s, names)
        started = time.time()
        time.sleep(7)
        victim = active_beat(s, redis_prefix, names)
        s.procs[victim][0].send_signal(signal.SIGKILL)
        killed = time.time()
        s.procs[victim][0].wait()
        survivors = [n for n in names if n != victim]
        successor = wait_active(s, survivors, timeout=30)
        took_over = time.time()
        time.sleep(12)
        stopped = time.time()  # ticks after this may or may not be fired
        s.stop(*survivors)
        jobs = drain_jobs(vhost_url)
        late = [line for line in s.log(successor).splitlines() if "dispatched" in line]
    failover = took_over - killed
    ticks = assert_exact_series(jobs, "fast", 2.0)
    expected = even_ticks(started, stopped, 2.0)
    sent = sorted(j.dispatched_at.timestamp() for j in jobs)
    pause = max(b - a for a, b in itertools.pairwise(sent))
    print(
        f"\nkill -9 of {victim}: {successor} active after {failover:.1f}s; "
        f"longest pause between dispatches {pause:.1f}s; {len(ticks)} ticks (expected "
        f"{expected}), none doubled; successor dispatched {len(late)} job(s)"
    )
    assert failover <= 10
    assert abs(len(ticks) - expected) <= 1
    assert len(jobs) == 2 * len(ticks)
    # The ticks of the failover window were fired late by the successor, not lost.
    replayed = [j for j in jobs if j.dispatched_at.timestamp() - j.tick_time > 1.5]
    assert replayed, "expected the successor to fire the missed ticks late"
    assert all(killed - 2 <= j.tick_time <= took_over + 1 for j in replayed)


def test_edits_of_sites_yaml_apply_without_restart(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    first = (
        HEADER
        + site("alpha", "{every: 2s, overlap: queue}", "eu")
        + site("gamma", "{every: 2s, overlap: queue}", "eu")
    )
    second = (
        HEADER
        + site("alpha", "{every: 4s, overlap: queue}", "eu")
        + site("beta", "{every: 2s, overlap: queue}", "eu")
    )
    invalid = second.replace("{every: 2s, overlap: queue}", "{every: soon, overlap: queue}")
    with stack(tmp_path, vhost_url, sqlite_url, first) as s:
        s.start("beat", "beat")
        wait_active(s, ["beat"])
        time.sleep(5)
        s.config.write_text(second)
        edited = time.time()
        wait_until(lambda: "reloaded: 2 site(s)" in s.log("beat"), timeout=5, what="reload")
        applied = time.time()
        time.sleep(9)
        s.config.write_text(invalid)
        broken = time.time()
        wait_until(lambda: "is invalid" in s.log("beat"), timeout=5, what="the invalid edit")
        time.sleep(7)
        s.stop("beat")
        log = s.log("beat")
        jobs = drain_jobs(vhost_url, ("eu",))

    def ticks(name: str, after: float = 0, before: float = 1e12) -> list[float]:
        return sorted(j.tick_time for j in jobs if j.site == name and after < j.tick_time <= before)

    print(
        f"\nreload took {applied - edited:.1f}s; alpha {len(ticks('alpha'))}, "
        f"beta {len(ticks('beta'))}, gamma {len(ticks('gamma'))} ticks"
    )
    assert applied - edited <= 5
    # gamma was removed: nothing after the reload.
    assert ticks("gamma", before=edited) and not ticks("gamma", after=applied)
    # beta was added: it fires every 2 s from the reload on, also after the invalid edit.
    beta = ticks("beta")
    assert beta[0] <= applied + 2.5
    assert {b - a for a, b in itertools.pairwise(beta)} == {2.0}
    assert len(ticks("beta", after=broken + 1)) >= 2
    # alpha's interval went from 2 s to 4 s, and it kept running after the invalid edit.
    new_alpha = ticks("alpha", after=applied)
    assert {b - a for a, b in itertools.pairwise(new_alpha)} == {4.0}
    assert all(t % 4 == 0 for t in new_alpha)
    assert len(ticks("alpha", after=broken + 1)) >= 1
    assert len(ticks("alpha", before=edited)) >= 2
    # The invalid edit is reported with its line, the old config kept.
    assert re.search(r"sites\.yaml:\d+: site 'beta': schedule\.every: not a duration", log), log
    assert "keeping the last good one" in log
    assert len(jobs) == len({(j.site, j.tick) for j in jobs})


def test_restart_after_all_beats_were_down_fires_only_the_latest_missed_tick(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    config = (
        HEADER
        + site("latest", "{every: 1s, overlap: queue}", "eu")
        + site("nothing", "{every: 1s, overlap: queue, catchup: none}", "eu")
    )
    with stack(tmp_path, vhost_url, sqlite_url, config) as s:
        s.start("beat", "beat", "--lease", "1")  # replay window 2 s
        wait_active(s, ["beat"])
        time.sleep(3)
        s.stop("beat")
        down = time.time()
        time.sleep(6)
        s.start("beat-again", "beat", "--lease", "1")
        wait_active(s, ["beat-again"])
        time.sleep(3)
        s.stop("beat-again")
        log = s.log("beat-again")
        jobs = drain_jobs(vhost_url, ("eu",))

    def after_down(name: str) -> list[float]:
        return sorted(j.tick_time for j in jobs if j.site == name and j.tick_time > down)

    latest, nothing = after_down("latest"), after_down("nothing")
    print(f"\nafter 6 s down, first ticks fired: latest {latest[:2]}, none {nothing[:2]}")
    # How many ticks were missed grows with how long the restarted beat took to
    # start on a loaded machine: at least the 6 s down, less the replay window.
    # Both sites are planned in the same pass: `latest` fires the most recent missed
    # tick (the one before `none`'s first), then both go on every second.
    assert nothing[0] - latest[0] == 1.0
    assert {b - a for a, b in itertools.pairwise(latest)} == {1.0}
    assert {b - a for a, b in itertools.pairwise(nothing)} == {1.0}
    assert latest[0] - down >= 4
    assert re.search(
        r"site=latest region=eu: ([4-9]|\d\d) missed tick\(s\) not fired \(catchup: latest\)", log
    )
    assert re.search(
        r"site=nothing region=eu: ([5-9]|\d\d) missed tick\(s\) not fired \(catchup: none\)", log
    )
    assert len(jobs) == len({(j.site, j.tick) for j in jobs})


SHOP_SITE = """\
  - name: shop
    engine: requests
    start_urls: {urls}
    regions: [{regions}]
    schedule: {{every: {every}}}
    politeness: {{delay: {delay}, robots: ignore}}
    extract: {{fields: {{title: {{css: "title::text"}}}}}}
"""
SHOP_HEADER = HEADER.replace("sites:\n", 'defaults:\n  allow_hosts: ["127.0.0.1"]\nsites:\n')


def shop_runs(s: Stack) -> list:
    from storage.queries import list_runs

    with s.sessions()() as session:
        return list_runs(session, site="shop", limit=500)


STORE_LAG = timedelta(seconds=3)


def test_a_tick_while_the_previous_run_is_still_running_is_recorded_as_skipped(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    from geoscrape.testsite import Catalog, serve

    with serve(catalog=Catalog(products=4)) as server:
        # Four pages 1.5 s apart: a crawl takes about 5 s, the site fires every 2 s.
        urls = json.dumps(
            [f"{server.url}/{p}" for p in ("index.html", "about.html", "prices.html", "robots.txt")]
        )
        config = SHOP_HEADER + SHOP_SITE.format(urls=urls, regions="eu", every="2s", delay=1.5)
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            s.ingest()
            wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
            s.start("beat", "beat")  # declares the queues the worker waits for
            s.worker("eu")

            def enough() -> bool:
                runs = shop_runs(s)
                return sum(r.status == "skipped" for r in runs) >= 3 and any(
                    r.status == "succeeded" for r in runs
                )

            wait_until(enough, timeout=90, what="skipped and succeeded runs")
            s.stop("beat")
            runs = shop_runs(s)
    by_id = {r.id: r for r in runs}
    skipped = [r for r in runs if r.status == "skipped"]
    crawled = [r for r in runs if r.status == "succeeded"]
    print(
        f"\noverlap: {len(crawled)} crawled, {len(skipped)} skipped, statuses "
        f"{Counter(r.status for r in runs)}"
    )
    assert len({r.tick for r in runs}) == len(runs)  # one run per tick
    for run in skipped:
        blocker = by_id[re.search(r"run (\S+) of an earlier tick", run.error or "").group(1)]
        tick = datetime.fromisoformat(run.tick.split("@")[1].replace("Z", "+00:00"))
        assert blocker.tick < run.tick
        # The beat knows what the store knows: a worker's finish reaches it over the
        # bus and ingest, on a loaded machine (CI: 4 test workers and image builds
        # on 2 cores) up to a few seconds after the worker's clock says it ended.
        assert blocker.finished_at is None or blocker.finished_at > tick - STORE_LAG
    for run in crawled:
        assert run.stats["pages"] == 4
        assert (run.finished_at - run.started_at).total_seconds() > 2  # it did overlap a tick


def test_jobs_of_a_region_without_workers_expire_while_the_other_region_runs(
    tmp_path: Path, vhost_url: str, sqlite_url: str, redis_prefix: str
) -> None:
    from geoscrape.testsite import Catalog, serve

    with serve(catalog=Catalog(products=4)) as server:
        urls = json.dumps([f"{server.url}/index.html"])
        config = SHOP_HEADER + SHOP_SITE.format(urls=urls, regions="eu, us", every="3s", delay=0)
        with stack(tmp_path, vhost_url, sqlite_url, config) as s:
            s.ingest()
            wait_until(lambda: "consuming" in s.log("ingest"), what="ingest to start")
            # The eu worker consumes before the first tick: each job expires at the
            # next tick (3 s), and a worker still starting on a loaded machine
            # would see its first job expire — a true outcome, not this test's.
            with Connection(vhost_url) as conn:
                declare_topology(conn, ["eu", "us"])
                s.worker("eu")  # no worker for us
                wait_until(
                    lambda: (queue_depth(conn, "scrape.eu") or (0, 0))[1] >= 1,
                    timeout=60,
                    what="the eu worker to consume",
                )
            s.start("beat", "beat")

            def settled() -> bool:
                runs = shop_runs(s)
                return (
                    sum(r.region == "us" and r.status == "expired" for r in runs) >= 3
                    and sum(r.region == "eu" and r.status == "succeeded" for r in runs) >= 3
                )

            wait_until(settled, timeout=90, what="expired us runs and succeeded eu runs")
            s.stop("beat")
            time.sleep(3.5)  # the last us job's deadline passes
            wait_until(
                lambda: all(r.status != "queued" for r in shop_runs(s) if r.region == "us"),
                timeout=20,
                what="the last us job to expire",
            )
            listed = s.cli("runs", "--site", "shop", "--region", "us")
            runs = shop_runs(s)
            with Connection(vhost_url) as conn:
                _, backlog, _ = conn.default_channel.queue_declare("scrape.us", passive=True)
    us = [r for r in runs if r.region == "us"]
    eu = [r for r in runs if r.region == "eu"]
    print(f"\nno us worker: us {Counter(r.status for r in us)}, eu {Counter(r.status for r in eu)}")
    assert {r.status for r in us} == {"expired"}
    assert all("no worker in region 'us'" in (r.error or "") for r in us)
    assert backlog == 0
    assert listed.returncode == 0 and listed.stdout.count("expired") >= len(us)
    assert {r.status for r in eu} <= {"succeeded", "skipped"}
    assert sum(r.status == "succeeded" for r in eu) >= 3
