"""Reliability commands (issue 6): `geoscrape dead` and `geoscrape dead requeue RUN`.

Dead jobs are kept in the `dead_jobs` table by ingest's dead-letter consumer
(storage/deadletter.py). Requeueing one publishes its job again, with the same
run id, to its region's queue, and puts the run back to `queued`: a run's
status otherwise only moves forward, and `dead` is final.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from geoscrape.clikit import out, sessions


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
    dead_app = typer.Typer(
        help="Dead-lettered jobs: list them, requeue one after a fix.",
        invoke_without_command=True,
    )
    app.add_typer(dead_app, name="dead")

    @dead_app.callback()
    def dead(
        ctx: typer.Context,
        site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
        all_: Annotated[bool, typer.Option("--all", help="Also jobs already requeued.")] = False,
    ) -> None:
        """List dead jobs, newest first (run id, site, region, why, attempts, when)."""
        if ctx.invoked_subcommand is not None:
            return
        # Imported per command: the store's modules would slow every `geoscrape` start.
        from storage.deadletter import list_dead_jobs

        with sessions()() as session:
            rows = list_dead_jobs(session, site=site, requeued=all_)
        if not rows:
            out.print("no dead jobs")
            return
        table = Table("run", "site", "region", "reason", "attempts", "dead at", "requeued", "error")
        for row in rows:
            table.add_row(
                row.run_id,
                row.site,
                row.region,
                row.reason,
                str(row.attempts),
                row.dead_at.strftime("%Y-%m-%d %H:%M:%S"),
                row.requeued_at.strftime("%Y-%m-%d %H:%M:%S") if row.requeued_at else "",
                (row.error or "")[:80],
            )
        out.print(table)

    @dead_app.command("requeue")
    def dead_requeue(
        run_id: Annotated[str, typer.Argument(help="The run id (or a unique prefix of it).")],
    ) -> None:
        """Publish a dead job again (same run id) to its region's queue."""
        from regions.bus import check_broker
        from scheduler.dispatch import publish_jobs
        from storage.deadletter import requeue

        check_broker()
        with sessions()() as session, session.begin():
            job = requeue(session, run_id, lambda job: publish_jobs([job]))
        out.print(f"requeued run {job.run_id} for {job.site} in {job.region}", highlight=False)
