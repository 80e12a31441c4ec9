"""Fire times of a site's schedule, tick ids and run ids: pure functions of the clock.

Every beat computes the same ticks from the same config, whatever its start
time, so ticks can be claimed by id in Redis (scheduler.beat):

- `every: N`: ticks are the multiples of N since the Unix epoch (UTC), so
  `every: 1h` fires on the hour; `timezone` changes nothing for intervals.
- `cron`: the 5-field expression matches the local wall clock of `timezone`.
  Each matching wall time fires once: a wall time that a DST change skips
  (spring forward) fires at the same UTC offset as before the change, i.e.
  right after the jump (02:30 on a 02:00->03:00 night fires at 03:30 new
  time); a wall time that happens twice (fall back) fires at its first
  occurrence only. Two wall times landing on the same instant fire once.
- `jitter: J`: a tick fires J * h later, h in [0, 1) a hash of (site, tick),
  so every beat agrees on it; the tick id stays the scheduled time.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

from scheduler.config import Config, Schedule

# Namespace of the run ids of scheduled runs: uuid5(NAMESPACE, "site/region/tick").
RUN_ID_NAMESPACE = uuid.UUID("6f1c2a3e-5b7d-4c1e-9a8f-3d2b1c0e9f47")
# Largest change of UTC offset at a DST transition that the cron search allows for.
_MAX_SHIFT = timedelta(hours=3)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_cron(expression: str) -> None:
    """Raise ValueError unless `expression` is a 5-field cron that fires at all."""
    if len(expression.split()) != 5:
        raise ValueError(
            f"cron {expression!r} must have 5 fields: minute hour day-of-month month day-of-week"
        )
    try:
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as exc:
        raise ValueError(f"invalid cron {expression!r}: {exc}") from None


def effective_schedule(config: Config, site_name: str) -> Schedule | None:
    """The schedule a site runs on (its own, else the defaults'); None: manual only."""
    site = config.site(site_name)
    schedule = site.schedule if site.schedule is not None else config.defaults.schedule
    if schedule is None or (schedule.every is None and schedule.cron is None):
        return None
    return schedule


def iso(moment: datetime) -> str:
    """UTC ISO 8601 with a Z, milliseconds only when there are some."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"


def tick_id(site: str, moment: datetime) -> str:
    """The id every job of one fire carries: the site and its scheduled time."""
    return f"{site}@{iso(moment)}"


def scheduled_run_id(site: str, region: str, tick: str) -> str:
    """Fixed by (site, region, tick): a doubled dispatch collapses into one run."""
    return str(uuid.uuid5(RUN_ID_NAMESPACE, f"{site}/{region}/{tick}"))


@dataclass(frozen=True)
class Timing:
    """The fire times of one site's schedule."""

    site: str
    schedule: Schedule

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.schedule.timezone)

    @property
    def fingerprint(self) -> str:
        """Changes when the fire times change (not with jitter or policies)."""
        s = self.schedule
        return f"every={s.every}|cron={s.cron}|tz={s.timezone}"

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment`."""
        if self.schedule.every is not None:
            step = round(self.schedule.every * 1000)
            elapsed = _millis(moment)
            return _from_millis((elapsed // step + 1) * step)
        return self._cron_after(moment)

    def at_or_before(self, moment: datetime) -> datetime:
        """The last tick at or before `moment`."""
        if self.schedule.every is not None:
            step = round(self.schedule.every * 1000)
            return _from_millis(_millis(moment) // step * step)
        return self._cron_at_or_before(moment)

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Ticks in (after, until], in order."""
        tick = self.next_after(after)
        while tick <= until:
            yield tick
            tick = self.next_after(tick)

    def delay(self, tick: datetime) -> timedelta:
        """The jitter of this tick: the same in every beat."""
        if not self.schedule.jitter:
            return timedelta(0)
        digest = hashlib.sha256(f"{self.site}/{iso(tick)}".encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        return timedelta(seconds=self.schedule.jitter * fraction)

    def fire_time(self, tick: datetime) -> datetime:
        return tick + self.delay(tick)

    # -- cron, DST-aware ---------------------------------------------------

    def _instant(self, wall: datetime) -> datetime:
        # fold=0: an ambiguous wall time is its first occurrence; a skipped one
        # keeps the offset from before the jump (lands just after it).
        return wall.replace(tzinfo=self.zone).astimezone(UTC)

    def _cron_after(self, moment: datetime) -> datetime:
        # Wall times do not map to instants in order around a DST change, so
        # search candidates from a little before, and keep the earliest instant.
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        candidates = croniter(self.schedule.cron, wall - _MAX_SHIFT)
        best: tuple[datetime, datetime] | None = None  # (instant, wall)
        while True:
            candidate = candidates.get_next(datetime)
            if best is not None and candidate > best[1] + _MAX_SHIFT:
                return best[0]
            instant = self._instant(candidate)
            if instant > moment and (best is None or instant < best[0]):
                best = (instant, candidate)

    def _cron_at_or_before(self, moment: datetime) -> datetime:
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        candidates = croniter(self.schedule.cron, wall + _MAX_SHIFT + timedelta(minutes=1))
        best: tuple[datetime, datetime] | None = None
        while True:
            candidate = candidates.get_prev(datetime)
            if best is not None and candidate < best[1] - _MAX_SHIFT:
                return best[0]
            instant = self._instant(candidate)
            if instant <= moment and (best is None or instant > best[0]):
                best = (instant, candidate)


def _millis(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _from_millis(millis: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=millis)


@dataclass(frozen=True)
class Plan:
    fire: list[datetime]  # ticks to dispatch now, in order
    last: datetime  # the new "last handled tick"


def plan_fires(
    timing: Timing,
    last: datetime,
    now: datetime,
    *,
    window: float,
    continuous: bool,
) -> Plan:
    """Which ticks after `last` to fire at `now`.

    `continuous`: a beat was active within `window` seconds (normal running, or
    a standby taking over from a beat that died): every tick that came due in
    the last `window` seconds fires, late if need be, so a failover loses none.
    Older missed ticks, and all of them after every beat was down
    (`continuous` false), follow `catchup`: only the most recent one, or none.
    A tick is due once its jittered fire time has passed.
    """
    horizon = now - timedelta(seconds=window)
    recent: list[datetime] = []
    older_latest: datetime | None = None
    start = max(last, horizon)
    if start > last:
        candidate = timing.at_or_before(start)
        while candidate > last and timing.fire_time(candidate) > now:  # jittered, not due
            candidate = timing.at_or_before(candidate - timedelta(milliseconds=1))
        if candidate > last:
            older_latest = candidate
    for tick in timing.ticks(start, now):
        if timing.fire_time(tick) > now:
            break  # not due yet: later ticks wait for it
        recent.append(tick)
    latest = recent[-1] if recent else older_latest
    if latest is None:
        return Plan([], last)
    catchup = timing.schedule.catchup == "latest"
    if continuous:
        fire = ([older_latest] if older_latest and catchup else []) + recent
    else:
        fire = [latest] if catchup else []
    return Plan(fire, latest)
