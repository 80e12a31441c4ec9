"""Distributed runs (scraper/frontier.py, scraper/distributed.py): one crawl, many workers.

The first tests drive the runner directly (real crawl children, real Redis);
the last ones run real `geoscrape worker` and `geoscrape ingest` processes on
a fresh vhost, and kill one worker with SIGKILL mid-crawl.
"""

from __future__ import annotations

import collections
import threading
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from regions.messages import ItemBatch, Job, RunFinished
from scheduler.config import Config
from scraper.distributed import add_stats, find_open_run
from scraper.frontier import Entry, Frontier, connect, run_key
from scraper.runner import run_job
from tests.harness import wait_until
from tests.pagesite import PageSite, serve_pages

FIELDS = {"id": {"css": ".id::text"}, "title": {"css": "h1::text"}}


def distributed_config(url: str, pages: int) -> dict[str, Any]:
    config = Config.model_validate(
        {
            "regions": {"eu": {}},
            "defaults": {"allow_hosts": ["127.0.0.1"]},
            "sites": [
                {
                    "name": "pages",
                    "regions": ["eu"],
                    "start_urls": [f"{url}/p/0.html"],
                    "follow": {"allow": ["/p/"]},
                    "extract": {"key": "id", "fields": FIELDS},
                    "politeness": {"delay": 0, "concurrency": 2, "robots": "ignore"},
                    "limits": {"max_depth": 30, "timeout": "5s", "max_pages": pages + 10},
                    "distributed": True,
                }
            ],
        }
    )
    return config.resolved_site("pages").model_dump(mode="json")


# -- the frontier itself ---------------------------------------------------------


def test_a_lapsed_lease_goes_back_to_the_queue(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOSCRAPE_FRONTIER_LEASE", "0.5")
    run = str(uuid.uuid4())
    one, two = Frontier(run), Frontier(run)
    entry = Entry.make("http://a.example/1", "fp1", {"depth": 2, "cookiejar": 3})
    assert one.add(entry) and not two.add(entry)  # seen, whoever found it
    taken = one.take()
    assert taken is not None and taken.meta == {"depth": 2}
    assert two.take() is None and two.pending()  # leased, not popped
    again = wait_until(two.take, timeout=10, what="the lease to lapse")
    assert again.raw == taken.raw
    two.ack(again.raw)
    assert not one.pending()


def test_one_round_trip_leases_a_batch_and_queues_a_page_of_links(redis_prefix: str) -> None:
    run = str(uuid.uuid4())
    one, two = Frontier(run), Frontier(run)
    entries = [Entry.make(f"http://a.example/{n}", f"fp{n}", {"depth": 1}) for n in range(5)]
    assert one.add_many([(e, False) for e in entries]) == 5
    assert two.add_many([(entries[0], False), (entries[0], True)]) == 1  # seen; forced again
    taken = one.take_many(3)
    assert [e.url for e in taken] == [f"http://a.example/{n}" for n in range(3)]  # FIFO
    assert [e.url for e in two.take_many(10)] == [
        "http://a.example/3",
        "http://a.example/4",
        "http://a.example/0",
    ]
    one.give_back([taken[2].raw])  # not crawled here: at once for anyone, not after the lease
    again = two.take()
    assert again is not None and again.raw == taken[2].raw
    assert two.take() is None and one.pending()  # the rest is leased


def test_page_counts_ride_along_and_are_exact_near_max_pages(redis_prefix: str) -> None:
    run = str(uuid.uuid4())
    one, two = Frontier(run), Frontier(run)
    assert one.count_page(limit=1000) == 1 and two.flush_count() == 0  # not sent yet
    one.take_many(1)  # sends it
    assert two.flush_count() == 1
    assert one.count_page(limit=10) == 2 and two.pages() == 1  # near the limit: at once
    assert two.flush_count() == 2 and two.count_page(limit=10) == 3


def test_stats_add_up() -> None:
    from regions.messages import RunStats

    own = RunStats(pages=3, items=2, status_codes={"200": 3}, duration=5, peak_rss=10)
    other = RunStats(pages=4, items=4, status_codes={"200": 3, "404": 1}, peak_rss=20)
    total = add_stats(own, [other])
    assert (total.pages, total.items, total.duration, total.peak_rss) == (7, 6, 5, 20)
    assert total.status_codes == {"200": 6, "404": 1}


# -- owner and participant through the runner --------------------------------------


def owner_and_participant(job: Job) -> tuple[list[BaseModel], list[BaseModel], RunFinished]:
    """Run `job` as its owner in a thread and, once the run is open, as a participant
    here; the owner's and the participant's messages, and the participant's result."""
    owner_out: list[BaseModel] = []
    helper_out: list[BaseModel] = []
    owner = threading.Thread(
        target=lambda: run_job(job, owner_out.append, worker="eu@a", timeout=120)
    )
    owner.start()
    wait_until(lambda: find_open_run(connect(), "eu"), timeout=60, what="the open run")
    helper = run_job(job, helper_out.append, worker="eu@b", participant=True)
    owner.join(timeout=120)
    return owner_out, helper_out, helper


def test_owner_and_participant_fetch_every_page_once(redis_prefix: str) -> None:
    with serve_pages(PageSite(pages=60, delay=0.1)) as site:
        job = Job(
            run_id=str(uuid.uuid4()),
            site="pages",
            region="eu",
            config=distributed_config(site.url, 60),
        )
        owner_out, helper_out, helper = owner_and_participant(job)
        hits = collections.Counter(h.path for h in site.page_hits())
    finished = owner_out[-1]
    assert isinstance(finished, RunFinished) and finished.status == "succeeded", finished
    assert hits == {f"/p/{n}.html": 1 for n in range(60)}
    assert helper.stats.pages > 0 and helper.stats.pages < 60
    assert finished.stats.pages == 60 and finished.stats.items == 60
    keys = {i.key for m in owner_out + helper_out if isinstance(m, ItemBatch) for i in m.items}
    assert keys == {str(n) for n in range(60)}
    assert not any(isinstance(m, RunFinished) for m in helper_out)  # only the owner's counts
    client = connect()
    assert client.exists(run_key(job.run_id, "closed"))
    assert not client.exists(run_key(job.run_id, "queue"))


def test_max_pages_holds_for_the_run_over_two_workers(redis_prefix: str) -> None:
    with serve_pages(PageSite(pages=60, delay=0.05)) as site:
        config = distributed_config(site.url, 60)
        config["limits"]["max_pages"] = 20
        config["politeness"]["concurrency"] = 4
        job = Job(run_id=str(uuid.uuid4()), site="pages", region="eu", config=config)
        owner_out, _, helper = owner_and_participant(job)
    finished = owner_out[-1]
    assert isinstance(finished, RunFinished), finished
    assert finished.stats.pages == 20, (finished.stats, helper.stats)
