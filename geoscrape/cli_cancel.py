"""`geoscrape cancel RUN`: stop a queued or running run (scheduler/cancel.py)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from geoscrape.clikit import out, sessions
from geoscrape.errors import BadInput

RECORD_TIMEOUT = 15.0  # seconds to wait for ingest to record the cancel


def register(app: typer.Typer) -> None:
    @app.command()
    def cancel(
        run: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    ) -> None:
        """Cancel a queued or running run: a queued job is dropped when a worker
        receives it; a running crawl is aborted, the items it stored are kept.
        The run's status becomes `cancelled`."""
        from regions.bus import check_broker, connect, publish_ingest
        from regions.messages import FINAL_STATUSES, RunStats, cancelled_run, dump
        from scheduler.cancel import mark_cancelled
        from storage.runinfo import run_detail

        store = sessions()  # opened once: each open checks the schema
        with store() as session:
            detail = run_detail(session, run)
        if detail.status in FINAL_STATUSES:
            raise BadInput(f"run {detail.id} already {detail.status}: nothing to cancel")
        where = f"running on {detail.worker}" if detail.status == "running" else "queued"
        check_broker()
        # The mark first: a worker that receives the job from now on drops it.
        mark_cancelled(detail.id)
        verdict = cancelled_run(
            detail.id,
            detail.site,
            detail.region,
            f"with 'geoscrape cancel' while it was {where}",
            stats=RunStats.model_validate(detail.stats),
        )
        with connect() as conn:
            publish_ingest(conn, dump(verdict))
        if not _recorded(store, detail.id):
            out.print(
                f"cancel of run {detail.id} sent; ingest has not recorded it yet "
                "(is 'geoscrape ingest' running?)",
                highlight=False,
            )
            return
        then = (
            "its worker aborts the crawl within seconds; the items stored so far are kept"
            if detail.status == "running"
            else "a worker that receives its job drops it"
        )
        out.print(f"cancelled run {detail.id} ({where}): {then}", highlight=False)


def _recorded(store: Any, run_id: str) -> bool:
    """Wait until the store shows the run cancelled, or RECORD_TIMEOUT passes."""
    from storage.runinfo import find_run

    deadline = time.monotonic() + RECORD_TIMEOUT
    while time.monotonic() < deadline:
        with store() as session:
            if find_run(session, run_id).status == "cancelled":
                return True
        time.sleep(0.2)  # polling the store: the condition, with a deadline
    return False
