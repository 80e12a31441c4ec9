"""The central ingest consumer: results from regional workers into the store.

Consumes the ``ingest`` queue (regions.bus.INGEST_QUEUE). Every delivery is
committed to the database *before* it is acknowledged, so a crash anywhere
leaves the message on the queue, and the store's idempotent writer turns the
redelivery into a no-op. Nothing is dropped:

- a body that is not a valid ingest message is stored in ``bad_messages``
  (then acked), where it can be inspected;
- while the database is unreachable (OperationalError and the like) the
  messages stay unacked and are retried with backoff until they commit;
- a message the database keeps rejecting for another reason (a poison
  message) is moved to ``bad_messages`` with the error after a few attempts,
  so it cannot block the queue.

Messages already waiting in the prefetch buffer are grouped into one
transaction (up to ``group_size``), which is what makes SQLite keep up with
many small messages; the writer merges a group's item batches into one
statement per table (storage.writer.apply_messages). The prefetch is twice
the group, so the broker delivers the next group while one is written. If a
group fails for a message-specific reason its messages are retried one by
one, so one poison message never takes the others with it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kombu import Connection, Consumer
from kombu.message import Message
from kombu.mixins import ConsumerMixin
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from regions.bus import INGEST_QUEUE, connect, queue_depth
from regions.messages import IngestMessage, MessageError, RunReleased, parse_ingest, utcnow
from storage.alerts import AlertSender
from storage.db import make_engine, session_factory
from storage.deadletter import (
    DeadLetter,
    apply_dead_letter,
    dead_letter_consumer,
    parse_dead_letter,
)
from storage.migrate import ensure_schema
from storage.reaper import PublishJob, Reaper, lease_settings
from storage.writer import IngestMessage as StoredMessage
from storage.writer import apply_messages, record_bad_message, release_run

log = logging.getLogger("geoscrape.ingest")

PREFETCH_COUNT = 200
GROUP_SIZE = 100
# How long to wait for more messages before committing a partial group. Prefetched
# messages arrive well within it; a longer wait only held back the commit of a
# burst's last message (50 ms of a one-page job's ~90 ms, docs/PERFORMANCE.md).
GROUP_WAIT = 0.002
# Attempts before a message the database keeps rejecting goes to bad_messages.
POISON_ATTEMPTS = 5


class _StopRequested(Exception):
    """should_stop became true while waiting for the broker."""


@dataclass
class _Delivery:
    message: Message
    parsed: IngestMessage | None = None
    error: str | None = None  # set: this message goes to bad_messages
    dead: DeadLetter | None = None  # from scrape.dead (parsed is then its verdict)
    received_at: datetime = field(default_factory=utcnow)

    @property
    def body_text(self) -> str:
        body = self.message.body
        if isinstance(body, bytes | bytearray | memoryview):
            return bytes(body).decode("utf-8", "backslashreplace")
        return str(body)

    def describe(self) -> str:
        if self.parsed is not None:
            p = self.parsed
            if p.kind == "worker_heartbeat":
                return f"{p.kind} worker={p.name}"
            return f"{p.kind} run={p.run_id}" + (f" seq={p.seq}" if p.kind == "items" else "")
        return f"delivery {self.message.delivery_tag}"


def is_transient(exc: BaseException) -> bool:
    """A database error that says nothing about the message: retry it forever."""
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


class Ingest(ConsumerMixin):
    """A ConsumerMixin that writes every ingest message to the store.

    ``should_stop`` may be a callable (polled between messages, and at least
    every second) besides ConsumerMixin's boolean attribute; ``ready`` is set
    once consuming.
    """

    def __init__(
        self,
        connection: Connection,
        sessions: sessionmaker[Session],
        *,
        should_stop: Callable[[], bool] | None = None,
        ready: threading.Event | None = None,
        prefetch_count: int = PREFETCH_COUNT,
        group_size: int = GROUP_SIZE,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        reaper: Reaper | None = None,
    ) -> None:
        self.connection = connection
        self.reaper = reaper
        self._next_reap = 0.0
        self._listening_since = 0.0
        self.sessions = sessions
        self._stop_fn = should_stop
        self._stop_flag = False
        self.ready = ready
        self.prefetch_count = prefetch_count
        self.group_size = max(1, group_size)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._pending: list[_Delivery] = []
        self._conn: Connection | None = None

    # -- stopping ------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        if not self._stop_flag and self._stop_fn is not None and self._stop_fn():
            self._stop_flag = True
        return self._stop_flag

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self._stop_flag = value

    def stop(self) -> None:
        self._stop_flag = True

    # -- kombu hooks ---------------------------------------------------------

    def get_consumers(self, consumer_cls: Callable[..., Consumer], channel: Any) -> list[Consumer]:
        return [
            consumer_cls(
                queues=[INGEST_QUEUE],
                on_message=self._on_message,
                accept=["json"],
                prefetch_count=self.prefetch_count,
            ),
            dead_letter_consumer(consumer_cls, self._on_dead_letter, self.prefetch_count),
        ]

    def _on_dead_letter(self, message: Message) -> None:
        delivery = _Delivery(message)
        try:
            delivery.dead = parse_dead_letter(message)
            delivery.parsed = delivery.dead.verdict
        except MessageError as exc:
            delivery.error = f"dead letter: {exc}"
        self._pending.append(delivery)

    def on_consume_ready(
        self, connection: Connection, channel: Any, consumers: Any, **kw: Any
    ) -> None:
        log.info("ingest consuming from queue %r", INGEST_QUEUE.name)
        if self.ready is not None:
            self.ready.set()

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        if self.should_stop:
            raise _StopRequested from exc
        log.warning("broker unreachable (%s); retrying in %.0fs", _one_line(exc), interval)

    def on_decode_error(self, message: Message, exc: BaseException) -> None:
        # Undecodable (e.g. corrupt compression): keep it like any bad message.
        self._pending.append(_Delivery(message, error=f"cannot decode: {_one_line(exc)}"))

    def _on_message(self, message: Message) -> None:
        delivery = _Delivery(message)
        try:
            body = message.decode()
        except Exception as exc:  # ContentDisallowed, DecodeError
            delivery.error = (
                f"cannot decode (content-type {message.content_type!r}): {_one_line(exc)}"
            )
        else:
            try:
                delivery.parsed = parse_ingest(body)
            except MessageError as exc:
                delivery.error = str(exc)
        self._pending.append(delivery)

    # -- the loop ------------------------------------------------------------

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        with contextlib.suppress(_StopRequested):
            super().run(_tokens, **kwargs)
        log.info("ingest stopped")

    def consume(
        self,
        limit: int | None = None,
        timeout: float | None = None,
        safety_interval: float = 1,
        **kwargs: Any,
    ) -> Iterator[None]:
        # ConsumerMixin.consume, plus grouping: commit when the group is full
        # or when no further message arrives within GROUP_WAIT.
        with self.consumer_context(**kwargs) as (conn, channel, _consumers):
            self._conn = conn
            # Deliveries of a previous connection can no longer be acked: drop them
            # (the broker redelivers them). Keep those of this channel: they may arrive
            # while the consumers start (a basic.consume waits for its ConsumeOk and
            # dispatches deliveries meanwhile); dropped, they would stay unacked for
            # as long as this connection lives.
            self._pending = [d for d in self._pending if d.message.channel is channel]
            self._listening_since = time.monotonic()
            while not self.should_stop:
                conn.heartbeat_check()
                self._maybe_reap()
                try:
                    conn.drain_events(timeout=GROUP_WAIT if self._pending else safety_interval)
                except TimeoutError:
                    if self._pending:
                        self._flush()
                    continue
                except OSError:
                    if not self.should_stop:
                        raise
                    break
                if len(self._pending) >= self.group_size:
                    self._flush()
                yield
            # Stopping: anything still pending is unacked and will be redelivered.
            self._pending = []

    def _maybe_reap(self) -> None:
        """Run the reaper when due, caught up, and listening for at least one lease."""
        reaper, now = self.reaper, time.monotonic()
        if reaper is None or self._pending or self._conn is None or now < self._next_reap:
            return
        self._next_reap = now + reaper.interval
        if now - self._listening_since < reaper.lease:
            return  # heartbeats sent while we were away may still be on their way
        depth = queue_depth(self._conn, INGEST_QUEUE.name)
        if depth is None or depth[0] > 0:
            return  # a backlog may hold fresher heartbeats than the store
        try:
            reaper.reap()
        except Exception as exc:  # database or broker away: next time
            log.warning("reaper: %s", _one_line(exc))

    # -- writing ------------------------------------------------------------

    def _flush(self) -> None:
        # At most group_size: more can be pending (delivered while the consumer
        # started); those wait for the next turn of the loop.
        group = self._pending[: self.group_size]
        self._pending = self._pending[self.group_size :]
        self._commit(group)

    def _write(self, group: list[_Delivery]) -> None:
        with self.sessions.begin() as session:
            # Consecutive ingest messages go to the writer together (it merges their
            # item batches); anything else is applied in its place in the order.
            run: list[StoredMessage] = []
            for d in group:
                msg = d.parsed
                if msg is not None and d.dead is None and not isinstance(msg, RunReleased):
                    run.append(msg)
                    continue
                apply_messages(session, run)
                run = []
                if d.parsed is not None and d.dead is not None:
                    apply_dead_letter(session, d.dead)
                elif isinstance(d.parsed, RunReleased):
                    self._release(session, d.parsed)
                else:
                    record_bad_message(session, d.body_text, d.error or "", d.received_at)
            apply_messages(session, run)

    def _release(self, session: Session, msg: RunReleased) -> None:
        """Requeue a run its worker handed back; published inside the transaction,
        so a failed publish rolls the release back (and the message is retried)."""
        job = release_run(session, msg)
        if job is None:
            return
        if self.reaper is None:
            log.warning(
                "run %s released by %s, but no publisher to requeue it", msg.run_id, msg.worker
            )
            return
        self.reaper.publish(job)
        log.info("run %s: handed back by %s (%s), requeued", msg.run_id, msg.worker, msg.reason)

    def _commit(self, group: list[_Delivery]) -> None:
        """Commit ``group`` then ack it; retry until done or stopping."""
        delay = self.retry_initial
        attempts = 0
        while True:
            try:
                self._write(group)
                break
            except Exception as exc:
                if is_transient(exc):
                    log.warning(
                        "database unavailable, %d message(s) kept unacked, retrying in %.1fs: %s",
                        len(group),
                        delay,
                        _one_line(exc),
                    )
                elif len(group) > 1:
                    # Find the culprit: each message on its own.
                    for d in group:
                        self._commit([d])
                    return
                else:
                    attempts += 1
                    d = group[0]
                    if d.parsed is None or attempts >= POISON_ATTEMPTS:
                        log.error(
                            "database rejects %s; moving it to bad_messages: %s",
                            d.describe(),
                            _one_line(exc),
                        )
                        d.parsed = None
                        d.error = f"rejected by the database: {_one_line(exc)}"
                        continue  # store it in bad_messages right away
                    else:
                        log.warning(
                            "database rejects %s (attempt %d/%d), retrying in %.1fs: %s",
                            d.describe(),
                            attempts,
                            POISON_ATTEMPTS,
                            delay,
                            _one_line(exc),
                        )
            if not self._wait(delay):
                return  # stopping: leave the group unacked, the broker redelivers it
            delay = min(delay * 2, self.retry_max)
        for d in group:
            d.message.ack()

    def _wait(self, seconds: float) -> bool:
        """Sleep; False if asked to stop.

        Keeps reading from the broker meanwhile, so its heartbeats are seen and
        a long database outage does not cost the connection. Messages arriving
        meanwhile (at most prefetch_count) join the next group.
        """
        deadline = time.monotonic() + seconds
        while not self.should_stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self._conn is None:
                time.sleep(min(left, 0.1))
                continue
            self._conn.heartbeat_check()
            with contextlib.suppress(TimeoutError):
                self._conn.drain_events(timeout=min(left, 0.25))
        return False


def run_ingest(
    broker_url: str,
    db_url: str,
    *,
    publish_job: PublishJob,
    should_stop: Callable[[], bool] | None = None,
    ready: threading.Event | None = None,
) -> None:
    """Bring the schema to head, then consume the ingest queue until should_stop().

    Also runs the reaper (storage/reaper.py) over the runs' leases (it
    redelivers jobs through `publish_job`, regions.app.job_publisher), and the
    alert sender (storage/alerts.py) in a thread of its own.
    """
    lease, max_attempts = lease_settings()  # a bad setting fails before anything starts
    stopping = should_stop or (lambda: False)
    delay = 0.5
    while True:
        try:
            ensure_schema(db_url)
            break
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            if stopping():
                return
            log.warning(
                "database unavailable at start, retrying in %.0fs: %s", delay, _one_line(exc)
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    reaper = Reaper(sessions, publish_job, lease=lease, max_attempts=max_attempts)
    # Alerts go out from their own thread: a slow or dead receiver never holds up a message.
    sender = AlertSender(sessions)
    sender.start()
    try:
        with connect(broker_url) as connection:
            Ingest(connection, sessions, should_stop=should_stop, ready=ready, reaper=reaper).run()
    finally:
        sender.stop()
        sender.join(timeout=15)
        engine.dispose()
