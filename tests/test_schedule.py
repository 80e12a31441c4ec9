"""Fire-time computation with a fixed clock (pure units), config checks, `geoscrape schedule`."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scheduler.config import Schedule
from scheduler.loader import ConfigError, parse_config
from scheduler.schedule import Timing, plan_fires, scheduled_run_id, tick_id


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def timing(**schedule: object) -> Timing:
    return Timing("site", Schedule.model_validate(schedule))


def fires(t: Timing, start: datetime, n: int) -> list[datetime]:
    out, moment = [], start
    for _ in range(n):
        moment = t.next_after(moment)
        out.append(moment)
    return out


def test_every_is_aligned_to_the_epoch_whatever_the_start() -> None:
    t = timing(every="15m")
    assert fires(t, utc(2024, 5, 1, 10, 7, 3), 3) == [
        utc(2024, 5, 1, 10, 15),
        utc(2024, 5, 1, 10, 30),
        utc(2024, 5, 1, 10, 45),
    ]
    assert t.next_after(utc(2024, 5, 1, 10, 15)) == utc(2024, 5, 1, 10, 30)  # strictly after
    assert t.at_or_before(utc(2024, 5, 1, 10, 15)) == utc(2024, 5, 1, 10, 15)
    assert t.at_or_before(utc(2024, 5, 1, 10, 29, 59)) == utc(2024, 5, 1, 10, 15)


def test_cron_fires_at_the_right_instant_across_spring_forward() -> None:
    # Europe/Berlin, 2024-03-31: 02:00 CET -> 03:00 CEST (01:00 UTC).
    daily = timing(cron="30 2 * * *", timezone="Europe/Berlin")
    assert fires(daily, utc(2024, 3, 29, 12), 4) == [
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 30),  # 02:30 does not exist: fires right after the jump (03:30 CEST)
        utc(2024, 4, 1, 0, 30),  # 02:30 CEST
        utc(2024, 4, 2, 0, 30),
    ]
    hourly = timing(cron="0 * * * *", timezone="Europe/Berlin")
    assert fires(hourly, utc(2024, 3, 30, 23, 30), 4) == [
        utc(2024, 3, 31, 0, 0),  # 01:00 CET
        utc(2024, 3, 31, 1, 0),  # 03:00 CEST (02:00 was skipped; it lands here, once)
        utc(2024, 3, 31, 2, 0),  # 04:00 CEST
        utc(2024, 3, 31, 3, 0),
    ]


def test_cron_fires_once_for_a_repeated_wall_time_at_fall_back() -> None:
    # Europe/Berlin, 2024-10-27: 03:00 CEST -> 02:00 CET (01:00 UTC); 02:30 happens twice.
    daily = timing(cron="30 2 * * *", timezone="Europe/Berlin")
    assert fires(daily, utc(2024, 10, 26, 12), 3) == [
        utc(2024, 10, 27, 0, 30),  # the first 02:30 (CEST) only
        utc(2024, 10, 28, 1, 30),  # 02:30 CET
        utc(2024, 10, 29, 1, 30),
    ]
    # New York, 2024-11-03 02:00 EDT -> 01:00 EST: a 9:00 job keeps local time.
    morning = timing(cron="0 9 * * 1-5", timezone="America/New_York")
    assert fires(morning, utc(2024, 11, 1, 12), 2) == [
        utc(2024, 11, 1, 13),  # Fri 09:00 EDT
        utc(2024, 11, 4, 14),  # Mon 09:00 EST
    ]
    assert morning.at_or_before(utc(2024, 11, 4, 13, 59)) == utc(2024, 11, 1, 13)


def test_jitter_is_the_same_in_every_beat_and_within_bounds() -> None:
    t = timing(every="1h", jitter="10m")
    ticks = fires(t, utc(2024, 1, 1), 50)
    delays = [t.delay(tick) for tick in ticks]
    assert delays == [timing(every="1h", jitter="10m").delay(tick) for tick in ticks]
    assert all(timedelta(0) <= d < timedelta(minutes=10) for d in delays)
    assert len(set(delays)) == 50


def test_tick_and_run_ids_are_fixed_by_site_region_and_time() -> None:
    tick = tick_id("shop", utc(2024, 1, 1, 0, 0, 2))
    assert tick == "shop@2024-01-01T00:00:02Z"
    assert scheduled_run_id("shop", "eu", tick) == scheduled_run_id("shop", "eu", tick)
    assert scheduled_run_id("shop", "eu", tick) != scheduled_run_id("shop", "us", tick)


def test_plan_fires_every_due_tick_within_the_window_after_a_failover() -> None:
    t = timing(every="2s")
    last = utc(2024, 1, 1, 0, 0, 10)
    now = utc(2024, 1, 1, 0, 0, 17, 500000)
    plan = plan_fires(t, last, now, window=10, continuous=True)
    assert plan.fire == [utc(2024, 1, 1, 0, 0, s) for s in (12, 14, 16)]
    assert plan.last == utc(2024, 1, 1, 0, 0, 16)
    assert plan_fires(t, plan.last, now, window=10, continuous=True).fire == []


def test_plan_after_every_beat_was_down_fires_only_the_latest_or_none() -> None:
    last = utc(2024, 1, 1, 0, 0, 0)
    now = utc(2024, 1, 1, 1, 0, 3)
    latest = plan_fires(timing(every="2s"), last, now, window=10, continuous=False)
    assert latest.fire == [utc(2024, 1, 1, 1, 0, 2)]
    assert latest.last == utc(2024, 1, 1, 1, 0, 2)
    none = plan_fires(timing(every="2s", catchup="none"), last, now, window=10, continuous=False)
    assert none.fire == []
    assert none.last == utc(2024, 1, 1, 1, 0, 2)
    # Running continuously but stalled past the window: old ticks follow catchup too.
    stalled = plan_fires(timing(every="2s"), last, now, window=10, continuous=True)
    assert stalled.fire == [utc(2024, 1, 1, 0, 59, 52)] + [
        utc(2024, 1, 1, 0, 59, s) for s in (54, 56, 58)
    ] + [utc(2024, 1, 1, 1, 0, 0), utc(2024, 1, 1, 1, 0, 2)]


def test_plan_waits_for_a_jittered_tick() -> None:
    t = timing(every="1m", jitter="30s")
    tick = utc(2024, 1, 1, 0, 1)
    delay = t.delay(tick)
    assert delay > timedelta(seconds=1)
    before = plan_fires(t, utc(2024, 1, 1), tick + delay / 2, window=10, continuous=True)
    assert before.fire == []
    after = plan_fires(t, utc(2024, 1, 1), tick + delay, window=10, continuous=True)
    assert after.fire == [tick]


HEAD = """\
regions:
  eu: {}
sites:
  - name: shop
    start_urls: ["http://127.0.0.1:1/"]
    regions: [eu]
    extract: {fields: {t: {css: "title::text"}}}
"""


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ('{cron: "61 * * * *"}', "sites.yaml:8: site 'shop': schedule.cron: invalid cron"),
        ('{cron: "* * *"}', "sites.yaml:8: site 'shop': schedule.cron: cron '* * *' must have 5"),
        (
            "{every: 1h, timezone: Mars/Olympus}",
            "sites.yaml:8: site 'shop': schedule.timezone: unknown time zone 'Mars/Olympus'",
        ),
        ("{every: 1h, overlap: wait}", "sites.yaml:8: site 'shop': schedule.overlap: "),
        ("{every: 1h, catchup: all}", "sites.yaml:8: site 'shop': schedule.catchup: "),
    ],
)
def test_bad_schedules_are_reported_with_their_line(schedule: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + f"    schedule: {schedule}\n", "sites.yaml")
    assert str(caught.value).startswith(message), str(caught.value)


def test_schedule_command_lists_next_fires_in_local_time_and_utc(tmp_path: Path) -> None:
    config = tmp_path / "sites.yaml"
    config.write_text(
        HEAD.replace("regions: [eu]", "regions: [eu, us]").replace("  eu: {}", "  eu: {}\n  us: {}")
        + '    schedule: {cron: "30 2 * * *", timezone: Europe/Berlin}\n'
        + "  - name: docs\n"
        + '    start_urls: ["http://127.0.0.1:1/"]\n'
        + "    regions: [eu]\n"
        + '    extract: {fields: {t: {css: "title::text"}}}\n'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoscrape.cli",
            "schedule",
            "--config",
            str(config),
            "--count",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [line for line in lines if "shop" in line]
    assert [row.split("│")[2].strip() for row in rows] == ["eu", "us"]
    assert all("02:30:00 CE" in row for row in rows)  # CET or CEST, by season
    assert all(":30:00Z" in row for row in rows)
    assert "manual only (no schedule): docs" in done.stdout
