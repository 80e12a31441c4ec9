"""Scheduling commands (issue 3): `geoscrape beat`, `geoscrape schedule`."""

from __future__ import annotations

from typing import Annotated

import typer

from geoscrape.clikit import DEFAULT_CONFIG, ConfigOption, out


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""

    @app.command()
    def beat(
        config: ConfigOption = DEFAULT_CONFIG,
        lease: Annotated[
            float,
            typer.Option(
                min=1,
                help="Lease of the active beat, s: a dead beat's successor "
                "takes over within about this.",
            ),
        ] = 5.0,
        reload_interval: Annotated[
            float, typer.Option(min=0.1, help="How often sites.yaml is checked for edits, s.")
        ] = 1.0,
        replay_window: Annotated[
            float | None,
            typer.Option(
                help="Missed ticks younger than this are fired late after a "
                "failover, s (default: 2 x lease)."
            ),
        ] = None,
    ) -> None:
        """Fire the sites' schedules; run several for high availability (one is active)."""
        import logging
        import signal
        import threading

        from regions.bus import broker_url, check_broker
        from regions.settings import settings
        from scheduler.beat import BeatOptions, run_beat
        from scheduler.redis import connect_redis
        from storage.code import code_pinner
        from storage.db import database_url
        from storage.queries import open_run_checker

        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s.%(msecs)03d %(name)s %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
        check_broker()
        client = connect_redis()
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        run_beat(
            config,
            broker_url=broker_url(),
            redis_client=client,
            prefix=settings().redis_prefix,
            open_run=open_run_checker(database_url()),
            pin_code=code_pinner(database_url()),
            options=BeatOptions(lease=lease, reload_interval=reload_interval, window=replay_window),
            should_stop=stopping.is_set,
        )

    @app.command()
    def schedule(
        config: ConfigOption = DEFAULT_CONFIG,
        count: Annotated[int, typer.Option(min=1, help="Fire times to show per site.")] = 3,
    ) -> None:
        """List each scheduled site and region with its next fire times (local and UTC)."""
        from rich.table import Table

        from regions.messages import utcnow
        from scheduler.check import _duration
        from scheduler.loader import load_config
        from scheduler.schedule import Timing, effective_schedule

        loaded = load_config(config)
        now = utcnow()
        table = Table("site", "region", "schedule", "next fires (site time zone)", "UTC")
        manual = []
        for site in loaded.sites:
            plan = effective_schedule(loaded, site.name)
            if plan is None:
                manual.append(site.name)
                continue
            timing = Timing(site.name, plan)
            ticks, tick = [], now
            for _ in range(count):
                tick = timing.next_after(tick)
                ticks.append(timing.fire_time(tick))
            local = "\n".join(
                t.astimezone(timing.zone).strftime("%Y-%m-%d %H:%M:%S %Z") for t in ticks
            )
            utc = "\n".join(t.strftime("%Y-%m-%d %H:%M:%SZ") for t in ticks)
            what = f"every {_duration(plan.every)}" if plan.every else f"cron {plan.cron}"
            what += f" ({plan.timezone}, overlap {plan.overlap}, catchup {plan.catchup})"
            for region in site.regions:
                table.add_row(site.name, region, what, local, utc)
        out.print(table)
        if manual:
            out.print(f"manual only (no schedule): {', '.join(manual)}", highlight=False)
