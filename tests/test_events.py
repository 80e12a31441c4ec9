"""`geoscrape worker --events`: Celery task events that `celery events` and Flower see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geoscrape.testsite import Catalog, serve
from geoscrape.testsite.config import shop_site_yaml
from regions.bus import connect, declare_topology
from scheduler.dispatch import plan_jobs, publish_jobs
from scheduler.loader import load_config
from tests.harness import stack, wait_until

pytestmark = pytest.mark.slow

HEADER = """\
regions:
  eu: {{}}
defaults:
  politeness: {{delay: 0, concurrency: 4, robots: obey}}
  allow_hosts: ["{host_port}"]
sites:
"""


def test_celery_events_dump_sees_the_crawl_task(tmp_path: Path, vhost_url: str) -> None:
    with serve(catalog=Catalog(products=2)) as shop:
        config_text = HEADER.format(host_port=f"{shop.host}:{shop.port}") + shop_site_yaml(
            "shop", shop.url
        )
        with stack(tmp_path, vhost_url, f"sqlite:///{tmp_path}/store.db", config_text) as s:
            with connect(vhost_url) as conn:
                declare_topology(conn, ["eu"])
            dump_log = tmp_path / "events.log"
            with dump_log.open("wb") as sink:
                dumper = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-b", vhost_url, "events", "--dump"],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            s.procs["celery-events"] = (dumper, dump_log)
            s.start("worker-eu", "worker", "--region", "eu", "--events")
            wait_until(
                lambda: "ready" in s.log("worker-eu"), timeout=90, what="the worker to be ready"
            )
            job = plan_jobs(load_config(s.config), "shop", trigger="manual")[0]
            publish_jobs([job], vhost_url)

            def seen(kind: str) -> bool:
                text = dump_log.read_text(errors="replace")
                return any(
                    kind in line and CRAWL in line and job.run_id in line
                    for line in text.splitlines()
                )

            wait_until(lambda: seen("task received"), timeout=120, what="task received")
            wait_until(lambda: seen("task succeeded"), timeout=120, what="task succeeded")
        assert dumper.poll() is not None  # stopped with the stack


CRAWL = "geoscrape.crawl"


def test_worker_without_events_sends_none(tmp_path: Path) -> None:
    from regions.worker import worker_app
    from scraper.runner import run_job
    from scraper.verify import RegionEgress

    url = "amqp://guest:guest@127.0.0.1:5672//"
    app = worker_app("eu", run_job, RegionEgress(None, None), url)
    assert app.conf.worker_send_task_events is False
    on = worker_app("eu", run_job, RegionEgress(None, None), url, events=True)
    assert on.conf.worker_send_task_events is True
