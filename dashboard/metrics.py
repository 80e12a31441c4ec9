"""`/metrics` in Prometheus text format, computed from the store on each scrape.

The store is the source of truth, so every value is read at scrape time (a
custom collector, not counters kept in this process): several API replicas
report the same numbers, and a restart loses nothing.

    geoscrape_runs_total{site,region,status}        runs in the store
    geoscrape_pages_total{region}                   pages fetched by its runs
    geoscrape_items_total{region}                   items extracted by its runs
    geoscrape_queue_depth{region}                   jobs waiting in scrape.<region>
    geoscrape_queue_consumers{region}               consumers of scrape.<region>
    geoscrape_ingest_queue_depth                    results waiting for ingest
    geoscrape_ingest_lag_seconds                    now - send time of the newest
                                                    worker heartbeat ingest stored
    geoscrape_worker_heartbeat_age_seconds{worker,region}
                                                    per worker not stopped, seen in the last day

Queue metrics are absent when the broker cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from regions.messages import utcnow
from storage.queries import StoreCounts, WorkerRow, live_workers, store_counts

router = APIRouter(include_in_schema=False)
WORKERS_WITHIN = timedelta(days=1)


class StoreCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], broker_url: str | None) -> None:
        self.sessions = sessions
        self.broker_url = broker_url

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.sessions() as session:
            counts = store_counts(session)
            workers = live_workers(session, seen_since=now - WORKERS_WITHIN)
        yield from self._runs(counts)
        yield from self._workers(counts, workers, now)
        yield from self._queues(counts.regions)

    def _runs(self, counts: StoreCounts) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "geoscrape_runs", "Runs in the store", labels=["site", "region", "status"]
        )
        for row in counts.runs:
            runs.add_metric([row.site, row.region, row.status], row.count)
        yield runs
        for name, help_text, by_region in (
            ("geoscrape_pages", "Pages fetched by the region's runs", counts.pages),
            ("geoscrape_items", "Items extracted by the region's runs", counts.items),
        ):
            family = CounterMetricFamily(name, help_text, labels=["region"])
            for region, value in sorted(by_region.items()):
                family.add_metric([region], value)
            yield family

    def _workers(
        self, counts: StoreCounts, workers: list[WorkerRow], now: datetime
    ) -> Iterator[Metric]:
        ages = GaugeMetricFamily(
            "geoscrape_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat was sent",
            labels=["worker", "region"],
        )
        for worker in sorted(workers, key=lambda w: w.name):
            ages.add_metric(
                [worker.name, worker.region], (now - worker.last_seen_at).total_seconds()
            )
        yield ages
        if counts.newest_heartbeat is not None:
            yield GaugeMetricFamily(
                "geoscrape_ingest_lag_seconds",
                "Seconds since the newest worker heartbeat ingest stored was sent",
                value=(now - counts.newest_heartbeat).total_seconds(),
            )

    def _queues(self, regions: list[str]) -> Iterator[Metric]:
        from regions.bus import INGEST_QUEUE, connect, queue_depth, scrape_queue_name

        try:
            with connect(self.broker_url) as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
                depths = {r: queue_depth(conn, scrape_queue_name(r)) for r in regions}
                ingest = queue_depth(conn, str(INGEST_QUEUE.name))
        except Exception:  # the store's metrics still count when the broker is down
            return
        depth = GaugeMetricFamily(
            "geoscrape_queue_depth", "Jobs waiting in scrape.<region>", labels=["region"]
        )
        consumers = GaugeMetricFamily(
            "geoscrape_queue_consumers", "Consumers of scrape.<region>", labels=["region"]
        )
        for region, found in depths.items():
            if found is not None:
                depth.add_metric([region], found[0])
                consumers.add_metric([region], found[1])
        yield depth
        yield consumers
        if ingest is not None:
            yield GaugeMetricFamily(
                "geoscrape_ingest_queue_depth", "Results waiting for ingest", value=ingest[0]
            )


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text format; follows the API's read token like every endpoint."""
    from dashboard.pages import _readable

    _readable(request)
    registry = CollectorRegistry(auto_describe=False)
    state: Any = request.app.state
    registry.register(StoreCollector(state.sessions, state.broker_url))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
