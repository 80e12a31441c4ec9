"""A region's `egress.source_address`: validated in config, checked at worker start,
and used by both engines (the shop's access log shows the client address)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from geoscrape.testsite import serve
from geoscrape.testsite.geo import GeoCatalog, Locale
from regions.errors import BadSourceAddress
from regions.messages import ItemBatch, Job
from regions.worker import check_source_address
from scheduler.config import Config
from scheduler.errors import SchedulerError
from scheduler.loader import load_config
from scraper.runner import run_job

CATALOG = GeoCatalog(
    {"eu": Locale("127.0.0.11/32", "EUR", 1.0), "us": Locale("127.0.0.12/32", "USD", 1.1)},
    products=3,
)


def test_a_bad_source_address_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text("regions:\n  eu:\n    egress:\n      source_address: 127.0.0.300\n")
    with pytest.raises(SchedulerError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "sites.yaml:4" in text and "bad source address '127.0.0.300'" in text, text


def test_the_worker_refuses_an_address_this_machine_does_not_have() -> None:
    check_source_address("127.0.0.12")  # all of 127/8 is local
    with pytest.raises(BadSourceAddress, match=r"192\.0\.2\.1: cannot send from it"):
        check_source_address("192.0.2.1")  # TEST-NET-1: never on this machine


@pytest.mark.parametrize("engine", ["requests", "scrapy"])
def test_a_crawl_sends_from_the_source_address(engine: str) -> None:
    with serve(catalog=CATALOG) as shop:
        site = {
            "name": "shop",
            "regions": ["us"],
            "engine": engine,
            "start_urls": [f"{shop.url}/product/{CATALOG.products[0].sku}.html"],
            "politeness": {"delay": 0, "robots": "ignore"},
            "allow_hosts": [f"{shop.host}:{shop.port}"],
            "extract": {
                "key": "sku",
                "fields": {
                    "sku": {"css": ".sku::text"},
                    "currency": {"css": ".price::attr(data-currency)"},
                },
            },
        }
        config = Config.model_validate({"regions": {"us": None}, "sites": [site]})
        resolved = config.resolved_site("shop").model_copy(update={"source_address": "127.0.0.12"})
        job = Job(
            run_id=uuid.uuid4().hex,
            site="shop",
            region="us",
            config=resolved.model_dump(mode="json"),
        )
        messages: list[object] = []
        finished = run_job(job, messages.append, worker="w")
        log = shop.access_log
    assert finished.status == "succeeded", finished.error
    assert log and {client for client, _ in log} == {"127.0.0.12"}, log
    items = [i for m in messages if isinstance(m, ItemBatch) for i in m.items]
    assert [i.data["currency"] for i in items] == ["USD"]
