"""The Celery app: at-least-once settings shared by dispatchers and workers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery

from regions.bus import CRAWL_TASK, broker_url, scrape_queue
from regions.messages import Job, dump, utcnow
from regions.tls import ssl_options

__all__ = ["CRAWL_TASK", "job_publisher", "make_app", "send_job"]


def make_app(
    url: str | None = None, regions: Iterable[str] = (), *, declare: bool = True
) -> Celery:
    """A Celery app on the geoscrape bus, knowing the queues of `regions`.

    ``declare=False`` for workers: their broker user may not declare queues.
    """
    url = url or broker_url()
    app = Celery("geoscrape", broker=url, set_as_current=False)
    app.conf.update(
        broker_use_ssl=ssl_options(url) or False,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results travel over the ingest queue, not a backend
        # At-least-once: a job stays unacked until its crawl starts (the worker's
        # crawl task acks it then, regions/worker.py); after that the run's lease
        # covers it (storage/reaper.py). Other tasks: acked after they ran.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_delivery_mode="persistent",
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        # Queues are declared by regions.bus with fixed arguments; Celery must
        # never invent one (a typo'd region would silently build a backlog).
        task_create_missing_queues=False,
        task_queues=[scrape_queue(r, no_declare=not declare) for r in regions],
        # A regional worker may touch nothing on the bus but its own queue and
        # ingest: no remote-control mailbox, no event exchange.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def job_publisher(broker_url: str) -> Callable[[Job], None]:
    """Publish a job as dispatch does: the Celery crawl task, confirmed, to its region.
    Handed to storage's reaper and `dead requeue`, which must not import Celery."""
    app = make_app(broker_url)

    def publish(job: Job) -> None:
        send_job(app, job)

    return publish


def send_job(app: Celery, job: Job, producer: Any = None) -> None:
    """Publish `job` as the crawl task to its region's queue (confirmed, persistent).

    The run id is the Celery task id. A job with `expires_at` carries the AMQP
    per-message TTL (`expiration`): RabbitMQ dead-letters it to `scrape.dead`
    (x-death reason `expired`) if no worker took it by then. Celery's own
    `expires` only sets a header a worker checks on receipt, so it cannot stop
    a backlog in a region without workers.
    """
    options: dict[str, Any] = {}
    if job.expires_at is not None:
        left = (job.expires_at - utcnow()).total_seconds()
        options["expiration"] = max(left, 0.001)  # kombu: seconds -> ms string
    app.send_task(
        CRAWL_TASK,
        args=[dump(job)],
        task_id=job.run_id,
        queue=scrape_queue(job.region),
        routing_key=job.region,
        producer=producer,
        **options,
    )
