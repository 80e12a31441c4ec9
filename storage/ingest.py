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
statement per table (storage.writer.apply_messages). If a group fails for a
message-specific reason its messages are retried one by one, so one poison
message never takes the others with it.

Two threads share the work: the consumer (kombu's loop) receives and parses
messages and builds a group's rows (storage.writer.prepare); a writer thread
commits the groups, one at a time and in order, and hands each committed
group back. The consumer acks it (a kombu channel belongs to one thread), so
the next group is parsed and built while one commits. At most two groups are
with the writer (one committing, one ready), and the prefetch is two groups,
so the broker delivers the next group as soon as one is acked. A partial group
goes to the writer only when it is idle, so under load groups fill up.

On PostgreSQL a group's ``contents`` and ``items`` rows are written in a
transaction of their own, on a second connection, while the rest of the group
is written (the server works on both at once); they commit first, so a run the
group marks finished never shows without its items, nor an observation without
its content. Their inserts give the same rows in any order and any number of
times, so the group is acked once both have committed, and a retry redoes only
the part that did not commit. Two writes of the main transaction need them and
wait for the side's commit first: a run's verdict (an `expect: coverage` check
joins the run's observations with their contents) and an extra sample's row (a
foreign key to its content; an observation names its content without one).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from storage.writer import (
    Prepared,
    apply_prepared,
    apply_side_rows,
    cleaned,
    has_side_rows,
    prepare,
    record_bad_message,
    release_run,
)

log = logging.getLogger("geoscrape.ingest")

GROUP_SIZE = 100
# Four groups: while one commits and the next waits ready, the two after it are
# already received (and parsed), so the writer never waits on the broker. With
# two groups the next one only started to arrive when a group was acked, and the
# writer idled a fifth of the time (py-spy, docs/PERFORMANCE.md).
PREFETCH_COUNT = 4 * GROUP_SIZE
# How long to wait for more messages before committing a partial group. Prefetched
# messages arrive well within it; a longer wait only held back the commit of a
# burst's last message (50 ms of a one-page job's ~90 ms, docs/PERFORMANCE.md).
GROUP_WAIT = 0.002
# Attempts before a message the database keeps rejecting goes to bad_messages.
POISON_ATTEMPTS = 5
# Groups handed to the writer thread and not yet back: one committing, one ready.
WRITER_DEPTH = 2
# How often the consumer looks for committed groups to ack while the writer is
# busy (it cannot be woken from the broker's socket); slower while the writer
# waits out a database outage.
ACK_POLL = 0.002
OUTAGE_POLL = 0.25


# The garbage collector's generation thresholds in the ingest process (the
# default is (700, 10, 10)). Parsing and building a group allocates some 40
# objects per item, none of them in reference cycles, so with the default the
# collector ran hundreds of times per group, full collections among them: ~40%
# of the consumer's CPU.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect garbage far less often: for the `geoscrape ingest` process."""
    gc.set_threshold(*GC_THRESHOLDS)


class _StopRequested(Exception):
    """should_stop became true while waiting for the broker."""


@dataclass
class _Delivery:
    message: Message
    parsed: IngestMessage | None = None
    error: str | None = None  # set: this message goes to bad_messages
    dead: DeadLetter | None = None  # from scrape.dead (parsed is then its verdict)
    received_at: datetime = field(default_factory=utcnow)
    raw: bool = False  # parsed straight from the body's JSON text

    @property
    def body_text(self) -> str:
        body = self.message.body
        if isinstance(body, bytes | bytearray | memoryview):
            return bytes(body).decode("utf-8", "backslashreplace")
        return str(body)

    @property
    def stored(self) -> StoredMessage | None:
        """The message for storage.writer; None: a dead letter, release or bad message."""
        msg = self.parsed
        if msg is None or self.dead is not None or isinstance(msg, RunReleased):
            return None
        return msg

    def describe(self) -> str:
        if self.parsed is not None:
            p = self.parsed
            if p.kind == "worker_heartbeat":
                return f"{p.kind} worker={p.name}"
            return f"{p.kind} run={p.run_id}" + (f" seq={p.seq}" if p.kind == "items" else "")
        return f"delivery {self.message.delivery_tag}"


# A group's writes in order: the prepared rows of consecutive ingest messages
# (storage.writer.prepare), or a delivery applied on its own (dead letter,
# run release, bad message).
_Step = Prepared | _Delivery


@dataclass
class _Group:
    """Deliveries committed in one transaction."""

    deliveries: list[_Delivery]
    steps: list[_Step] | None = None  # None: build them when writing
    # Committed so far: everything but the contents and items rows / those rows
    # (PostgreSQL).
    main_done: bool = False
    side_done: bool = False


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
        self._channel: Any = None
        self._dialect = sessions.kw["bind"].dialect.name
        # The writer thread: groups in, lists of committed deliveries out (to ack),
        # then None once a group is done with.
        self._todo: queue.SimpleQueue[_Group | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[list[_Delivery] | None] = queue.SimpleQueue()
        self._in_flight = 0  # groups handed to the writer and not done with
        self._backing_off = False  # the writer waits out a database error
        self._stopping = threading.Event()  # wakes the writer from a backoff
        self._writer_error: BaseException | None = None
        self._side = ThreadPoolExecutor(1, thread_name_prefix="ingest-side")

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
        self._stopping.set()

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
        if message.content_type == "application/json" and message.content_encoding == "utf-8":
            # As published: validated straight from the body's JSON text, without
            # kombu's decode to a dict first. Anything it rejects takes the long
            # way, for the error that names the cause.
            with contextlib.suppress(MessageError):
                delivery.parsed = parse_ingest(message.body)
                delivery.raw = isinstance(message.body, str | bytes)
                self._pending.append(delivery)
                return
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
        writer = threading.Thread(target=self._writer, name="ingest-writer", daemon=True)
        writer.start()
        try:
            with contextlib.suppress(_StopRequested):
                super().run(_tokens, **kwargs)
        finally:
            self.stop()  # also when an error ends the run: the writer gives up its retries
            self._todo.put(None)
            writer.join()
            self._side.shutdown()
        log.info("ingest stopped")

    def consume(
        self,
        limit: int | None = None,
        timeout: float | None = None,
        safety_interval: float = 1,
        **kwargs: Any,
    ) -> Iterator[None]:
        # ConsumerMixin.consume, plus grouping: a group goes to the writer when it
        # is full, or when no further message arrives within GROUP_WAIT and the
        # writer is idle; and the acks of what the writer committed.
        with self.consumer_context(**kwargs) as (conn, channel, _consumers):
            self._conn, self._channel = conn, channel
            # Deliveries of a previous connection can no longer be acked: drop them
            # (the broker redelivers them). Keep those of this channel: they may arrive
            # while the consumers start (a basic.consume waits for its ConsumeOk and
            # dispatches deliveries meanwhile); dropped, they would stay unacked for
            # as long as this connection lives.
            self._pending = [d for d in self._pending if d.message.channel is channel]
            self._listening_since = time.monotonic()
            try:
                while not self.should_stop:
                    self._ack_committed()
                    if len(self._pending) >= self.group_size:
                        self._flush()  # a commit may have made room
                    conn.heartbeat_check()
                    self._maybe_reap()
                    if self._backing_off:
                        wait = OUTAGE_POLL
                    elif self._pending or self._in_flight:
                        wait = GROUP_WAIT if self._pending else ACK_POLL
                    else:
                        wait = safety_interval
                    try:
                        conn.drain_events(timeout=wait)
                    except TimeoutError:
                        if self._pending and not self._in_flight:
                            self._flush()  # a partial group: nothing else arrived
                        continue
                    except OSError:
                        if not self.should_stop:
                            raise
                        break
                    if len(self._pending) >= self.group_size:
                        self._flush()
                    yield
            finally:
                # Stopping (or the connection is lost): anything still pending is
                # unacked and will be redelivered; what the writer commits meanwhile
                # is acked while the channel lasts.
                self._pending = []
                if self.should_stop:
                    self._stopping.set()
                    self._ack_committed(until_idle=True)

    def _ack_committed(self, until_idle: bool = False) -> None:
        """Ack what the writer committed; with until_idle, wait until it is idle."""
        while True:
            if self._writer_error is not None:
                raise RuntimeError("the ingest writer thread failed") from self._writer_error
            try:
                acks = self._done.get(block=until_idle and self._in_flight > 0, timeout=1)
            except queue.Empty:
                if until_idle and self._in_flight:
                    continue
                return
            if acks is None:
                self._in_flight -= 1
                continue
            for d in acks:
                if d.message.channel is self._channel:  # else the broker redelivers it
                    with contextlib.suppress(*self.connection.connection_errors):
                        d.message.ack()

    def _maybe_reap(self) -> None:
        """Run the reaper when due, caught up, and listening for at least one lease."""
        # Only while the writer is idle: both publish jobs through the reaper.
        reaper, now = self.reaper, time.monotonic()
        busy = self._pending or self._in_flight
        if reaper is None or busy or self._conn is None or now < self._next_reap:
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
        """Hand the next group to the writer, if it has room for one."""
        if self._in_flight >= WRITER_DEPTH:
            return  # the group fills up meanwhile; a commit makes room
        # At most group_size: more can be pending (delivered while the consumer
        # started); those wait for the next turn of the loop.
        group = _Group(self._pending[: self.group_size])
        self._pending = self._pending[self.group_size :]
        # Built here, while the writer commits the previous group. A failure is
        # the writer's to handle (it builds them again, inside its retries).
        with contextlib.suppress(Exception):
            group.steps = self._steps(group.deliveries)
        self._in_flight += 1
        self._todo.put(group)

    def _writer(self) -> None:
        """The writer thread: commit each group handed over, in order."""
        try:
            while (group := self._todo.get()) is not None:
                if not self.should_stop:  # stopping: leave it unacked
                    self._commit(group)
                self._done.put(None)
        except BaseException as exc:  # pragma: no cover - a bug: the consumer raises it
            self._writer_error = exc
            self._done.put(None)

    def _steps(self, deliveries: list[_Delivery]) -> list[_Step]:
        # Consecutive ingest messages go to the writer together (it merges their
        # item batches); anything else is applied in its place in the order.
        steps: list[_Step] = []
        run: list[StoredMessage] = []
        for d in deliveries:
            if (msg := d.stored) is not None:
                run.append(cleaned(msg, d.message.body if d.raw else None))
                continue
            if run:
                steps.append(prepare(run, self._dialect, clean=True))
                run = []
            steps.append(d)
        if run:
            steps.append(prepare(run, self._dialect, clean=True))
        return steps

    def _write(self, group: _Group) -> None:
        if group.steps is None:
            group.steps = self._steps(group.deliveries)
        prepared = [step for step in group.steps if not isinstance(step, _Delivery)]
        apart = self._dialect == "postgresql" and any(has_side_rows(p) for p in prepared)
        side = None
        if apart and not group.side_done:
            side = self._side.submit(self._write_side, prepared)

        def side_committed() -> None:
            if side is not None and not group.side_done:
                side.result()
                group.side_done = True

        error: Exception | None = None
        try:
            if not group.main_done:
                # The contents and items commit first: a run this transaction marks
                # finished is never visible before its items are, nor an
                # observation before its content.
                self._write_main(group.steps, side_rows=not apart, side_committed=side_committed)
                group.main_done = True
        except Exception as exc:
            error = exc
        try:
            side_committed()  # also when the main part failed: never two at once
        except Exception as exc:
            error = error or exc
        if error is not None:
            raise error

    def _write_main(
        self, steps: list[_Step], side_rows: bool, side_committed: Callable[[], None]
    ) -> None:
        # A verdict (a RunFinished, a dead letter's) may read the group's contents
        # (an `expect: coverage` check), and an extra sample's row references its
        # content: the side commits before either is written.
        with self.sessions.begin() as session:
            for step in steps:
                if not isinstance(step, _Delivery):
                    apply_prepared(session, step, side_rows, side_committed)
                elif step.parsed is not None and step.dead is not None:
                    side_committed()
                    apply_dead_letter(session, step.dead)
                elif isinstance(step.parsed, RunReleased):
                    self._release(session, step.parsed)
                else:
                    record_bad_message(session, step.body_text, step.error or "", step.received_at)
            side_committed()

    def _write_side(self, prepared: list[Prepared]) -> None:
        with self.sessions.begin() as session:
            for p in prepared:
                apply_side_rows(session, p)

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

    def _commit(self, group: _Group) -> None:
        """Commit ``group`` then hand it back for acking; retry until done or stopping."""
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
                        len(group.deliveries),
                        delay,
                        _one_line(exc),
                    )
                elif len(group.deliveries) > 1:
                    # Find the culprit: each message on its own.
                    for d in group.deliveries:
                        self._commit(_Group([d], main_done=group.main_done))
                    return
                else:
                    attempts += 1
                    d = group.deliveries[0]
                    if d.parsed is None or attempts >= POISON_ATTEMPTS:
                        log.error(
                            "database rejects %s; moving it to bad_messages: %s",
                            d.describe(),
                            _one_line(exc),
                        )
                        d.parsed = None
                        d.error = f"rejected by the database: {_one_line(exc)}"
                        group.steps, group.main_done = None, False
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
        self._done.put(group.deliveries)

    def _wait(self, seconds: float) -> bool:
        """Back off for ``seconds``; False if asked to stop.

        The consumer thread keeps reading from the broker meanwhile, so its
        heartbeats are seen and a long database outage does not cost the
        connection.
        """
        self._backing_off = True
        try:
            deadline = time.monotonic() + seconds
            while not self.should_stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._stopping.wait(min(left, 0.25))
            return False
        finally:
            self._backing_off = False


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
