"""`geoscrape beat`: fire each site's schedule, one active beat among many.

Not celery.beat: its scheduler keeps state per process (a shelve file), so
high availability, per-tick idempotency, reload and catchup would each mean
overriding most of it. This loop is small and each guarantee has one place:

- fire times are pure functions of the config (scheduler.schedule), so every
  beat computes the same ticks and the same tick ids;
- one beat is active: a short Redis lease (scheduler.ha), checked by the
  local clock before every dispatch;
- each (site, region, tick) is claimed once in Redis (SET NX) before it is
  published, whatever the lease says; its run id is fixed by (site, region,
  tick), so even a doubled publish would collapse into one run in the store;
- the last handled tick per (site, region) lives in Redis, with a fingerprint
  of the schedule: a standby that takes over fires the ticks the dead beat
  missed (those within `window` seconds), and after every beat was down only
  the most recent missed tick fires (`catchup: latest`) or none;
- the config is re-read when the file changes (scheduler.reload); an invalid
  edit is logged as FILE:LINE and the last good config stays in force;
- overlap: at a tick, a run of the same site and region still queued (before
  its deadline) or running in the store skips the tick (`overlap: skip`),
  recorded as a run with status `skipped`;
- every job expires at its site's next tick (RabbitMQ message TTL, and the
  worker checks too), so a region without workers builds no backlog.

Jobs are published through the Celery app (scheduler.dispatch.send_jobs).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import redis
from kombu import Connection

from regions.app import make_app
from regions.bus import connect, declare_topology, publish_ingest
from regions.messages import CodeRef, RunQueued, dump, utcnow, verdict
from scheduler.dispatch import DispatchError, plan_jobs, send_jobs
from scheduler.ha import Lease
from scheduler.reload import ConfigWatcher
from scheduler.schedule import (
    Timing,
    effective_schedule,
    iso,
    plan_fires,
    scheduled_run_id,
    tick_id,
)

# "Is a run of (site, region) other than run_id still queued or running at
# now?" -> (its id, its status), or None (also when the store cannot tell: a
# job expires at the next tick anyway). Given by the caller (the CLI passes
# storage.queries.open_run_checker), so the scheduler never imports storage.
OpenRun = Callable[[str, str, str, datetime], tuple[str, str] | None]

log = logging.getLogger("geoscrape.beat")

SCHEDULE_TRIGGER = "schedule"
STANDBY_POLL = 0.5  # how often a standby tries to take the lease
LOOP_INTERVAL = 0.1
MAX_COUNT = 100_000  # missed ticks counted for the log line, at most
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class BeatOptions:
    lease: float = 5.0  # seconds; a dead beat is replaced within about this
    reload_interval: float = 1.0  # how often sites.yaml is checked for changes
    window: float | None = None  # missed ticks replayed after a failover; default 2 * lease

    @property
    def replay_window(self) -> float:
        return self.window if self.window is not None else 2 * self.lease


class Keys:
    """Every Redis key of the scheduler, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lease = f"{prefix}beat:lease"
        self.alive = f"{prefix}beat:alive"  # ms since epoch, the active beat's last loop

    def last(self, site: str, region: str) -> str:
        return f"{self.prefix}last:{site}:{region}"

    def tick(self, site: str, region: str, moment: datetime) -> str:
        return f"{self.prefix}tick:{site}:{region}:{iso(moment)}"


def _ms(moment: datetime) -> int:
    return int((moment - _EPOCH) / timedelta(milliseconds=1))


def _from_ms(value: Any) -> datetime:
    return _EPOCH + timedelta(milliseconds=int(value))


class Beat:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        broker_url: str,
        redis_client: redis.Redis,
        prefix: str,
        open_run: OpenRun | None,
        pin_code: Callable[[str], CodeRef] | None = None,
        options: BeatOptions = BeatOptions(),
    ) -> None:
        self.watcher = ConfigWatcher(config_path)
        self.broker_url = broker_url
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.options = options
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease = Lease(redis_client, self.keys.lease, self.name, options.lease)
        self.open_run = open_run
        self.pin_code = pin_code
        self._next_due: dict[tuple[str, str], datetime] = {}
        self._active = False
        self._last_attempt = 0.0
        self._last_reload = time.monotonic()
        self._last_error = ""
        self.app = make_app(broker_url)
        self.conn: Connection = connect(broker_url)

    # -- the loop ------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        self.conn.ensure_connection(max_retries=3)
        declare_topology(self.conn, self.watcher.config.regions)
        log.info(
            "beat %s started: %d scheduled site(s), lease %gs, replay window %gs",
            self.name,
            len(self._scheduled()),
            self.options.lease,
            self.options.replay_window,
        )
        try:
            while not should_stop():
                self.step()
                time.sleep(LOOP_INTERVAL)
        finally:
            self._stop()

    def step(self) -> None:
        """One pass: reload if due, hold or seek the lease, fire what is due."""
        mono = time.monotonic()
        if mono - self._last_reload >= self.options.reload_interval:
            self._last_reload = mono
            if self.watcher.poll():
                self._next_due.clear()
                declare_topology(self.conn, self.watcher.config.regions)
        try:
            self._hold_lease(mono)
            if self.lease.held:
                self._fire_due()
            self.conn.heartbeat_check()
            self._last_error = ""
        # Flattened: an except tuple nested in a tuple is a TypeError at match time.
        except (redis.RedisError, OSError, *self.conn.connection_errors) as exc:
            text = f"{type(exc).__name__}: {exc}"
            if text != self._last_error:  # once per distinct error, not every loop
                log.warning("beat %s: %s; retrying", self.name, text)
                self._last_error = text

    def _hold_lease(self, mono: float) -> None:
        if not self.lease.due():
            return
        if not self._active and mono - self._last_attempt < STANDBY_POLL:
            return
        self._last_attempt = mono
        try:
            self.lease.refresh()
        finally:
            held = self.lease.held
            if held != self._active:
                self._active = held
                self._next_due.clear()
                if held:
                    log.info("beat %s: active (took the lease)", self.name)
                else:
                    log.warning("beat %s: lost the lease; standing by", self.name)

    def _stop(self) -> None:
        if self._active:
            try:
                self.lease.release()
                log.info("beat %s: released the lease", self.name)
            except redis.RedisError:
                pass
        self.conn.release()
        log.info("beat %s stopped", self.name)

    # -- firing -------------------------------------------------------------

    def _scheduled(self) -> list[tuple[str, str, Timing]]:
        config = self.watcher.config
        entries = []
        for site in config.sites:
            schedule = effective_schedule(config, site.name)
            if schedule is not None:
                timing = Timing(site.name, schedule)
                entries += [(site.name, region, timing) for region in site.regions]
        return entries

    def _fire_due(self) -> None:
        now = utcnow()
        previous = self.redis.getset(self.keys.alive, _ms(now))
        window = self.options.replay_window
        continuous = previous is not None and (now - _from_ms(previous)).total_seconds() <= window
        for site, region, timing in self._scheduled():
            due = self._next_due.get((site, region))
            if due is not None and now < due:
                continue
            if not self.lease.held:
                return
            self._next_due[(site, region)] = self._handle(site, region, timing, now, continuous)

    def _handle(
        self, site: str, region: str, timing: Timing, now: datetime, continuous: bool
    ) -> datetime:
        """Fire the due ticks of (site, region); the next time to look at it."""
        key = self.keys.last(site, region)
        state = self.redis.hgetall(key)
        if not state or state.get("fp") != timing.fingerprint:
            # New, or its schedule changed: start from now, first fire at the next tick.
            self.redis.hset(key, mapping={"tick": _ms(now), "fp": timing.fingerprint})
            first = timing.next_after(now)
            log.info(
                "schedule site=%s region=%s: %s; next tick %s",
                site,
                region,
                timing.fingerprint,
                iso(first),
            )
            return timing.fire_time(first)
        last = _from_ms(state["tick"])
        plan = plan_fires(
            timing, last, now, window=self.options.replay_window, continuous=continuous
        )
        missed = sum(1 for _ in islice(timing.ticks(last, plan.last), MAX_COUNT)) - len(plan.fire)
        if missed > 0:
            log.info(
                "site=%s region=%s: %d%s missed tick(s) not fired (catchup: %s)",
                site,
                region,
                missed,
                "+" if missed + len(plan.fire) >= MAX_COUNT else "",
                timing.schedule.catchup,
            )
        for tick in plan.fire:
            if not self.lease.held:
                return now  # lost the lease mid-way: the next holder resumes from `last`
            self._fire(site, region, timing, tick)
            self.redis.hset(key, "tick", _ms(tick))
        if plan.last != last:
            self.redis.hset(key, "tick", _ms(plan.last))
        return timing.fire_time(timing.next_after(plan.last))

    def _fire(self, site: str, region: str, timing: Timing, tick: datetime) -> None:
        """Dispatch (or skip) one tick of one region, at most once across all beats."""
        claim = self.keys.tick(site, region, tick)
        interval = (timing.next_after(tick) - tick).total_seconds()
        ttl = int(max(3600, 3 * interval, 3 * self.options.replay_window))
        tid = tick_id(site, tick)
        if not self.redis.set(claim, self.name, nx=True, ex=ttl):
            log.info("tick site=%s region=%s tick=%s already handled", site, region, tid)
            return
        try:
            run_id = scheduled_run_id(site, region, tid)
            now = utcnow()
            deadline = timing.next_after(max(tick, now))
            blocking = None
            if timing.schedule.overlap == "skip":
                blocking = self._blocking_run(site, region, run_id, now)
            if blocking is not None:
                self._publish_skipped(site, region, tid, run_id, blocking, now)
                log.info(
                    "skipped site=%s region=%s tick=%s run=%s: run %s still %s",
                    site,
                    region,
                    tid,
                    run_id,
                    *blocking,
                )
            else:
                config = self.watcher.config
                try:
                    [job] = plan_jobs(
                        config,
                        site,
                        [region],
                        trigger=SCHEDULE_TRIGGER,
                        tick=tid,
                        pin_code=self._pin_code,
                    )
                except DispatchError as exc:  # e.g. no code deployed yet: this tick is lost
                    log.error(
                        "tick site=%s region=%s tick=%s not dispatched: %s", site, region, tid, exc
                    )
                    return
                job = job.model_copy(update={"run_id": run_id, "expires_at": deadline})
                send_jobs(self.app, self.conn, [job])
                log.info(
                    "dispatched site=%s region=%s tick=%s run=%s expires=%s",
                    site,
                    region,
                    tid,
                    run_id,
                    iso(deadline),
                )
            self.redis.set(claim, "sent", xx=True, keepttl=True)
        except BaseException:
            # Not published: free the tick so that this or another beat retries it.
            if self.redis.get(claim) == self.name:
                self.redis.delete(claim)
            raise

    def _pin_code(self, name: str) -> CodeRef:
        """The newest bundle of NAME, for `project: deployed:NAME` sites: asks the
        injected `pin_code` (storage.code.code_pinner), which needs the store."""
        if self.pin_code is None:
            raise DispatchError("deployed code needs the store (GEOSCRAPE_DATABASE_URL)")
        return self.pin_code(name)

    def _publish_skipped(
        self,
        site: str,
        region: str,
        tick: str,
        run_id: str,
        blocking: tuple[str, str],
        now: datetime,
    ) -> None:
        queued = RunQueued(
            run_id=run_id,
            site=site,
            region=region,
            trigger=SCHEDULE_TRIGGER,
            tick=tick,
            queued_at=now,
        )
        reason = f"skipped: run {blocking[0]} of an earlier tick is still {blocking[1]}"
        finished = verdict(run_id, site, region, "skipped", reason, at=now)
        publish_ingest(self.conn, dump(queued))
        publish_ingest(self.conn, dump(finished))

    # -- overlap ----------------------------------------------------------------

    def _blocking_run(
        self, site: str, region: str, run_id: str, now: datetime
    ) -> tuple[str, str] | None:
        """(id, status) of a run of (site, region) still in progress, or None
        (no store given, or it cannot tell: then the tick is dispatched)."""
        return None if self.open_run is None else self.open_run(site, region, run_id, now)


def run_beat(
    config_path: str | os.PathLike[str],
    *,
    broker_url: str,
    redis_client: redis.Redis,
    prefix: str,
    open_run: OpenRun | None,
    pin_code: Callable[[str], CodeRef] | None,
    options: BeatOptions,
    should_stop: Callable[[], bool],
) -> None:
    Beat(
        config_path,
        broker_url=broker_url,
        redis_client=redis_client,
        prefix=prefix,
        open_run=open_run,
        pin_code=pin_code,
        options=options,
    ).run(should_stop)
