"""The full story of a run: `geoscrape runs show RUN` and `geoscrape fetches RUN`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from geoscrape.cli_query import FormatOption, ViewFormat
from geoscrape.clikit import out, sessions

RunArg = Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")]


def register(app: typer.Typer, runs_app: typer.Typer) -> None:
    @runs_app.command("show")
    def show(run: RunArg, format: FormatOption = ViewFormat.table) -> None:
        """One run in full: status, complete error, stats, worker and egress, limits
        reached, the config its job carried."""
        from storage.runinfo import run_detail

        with sessions()() as session:
            detail = run_detail(session, run)
        if format is not ViewFormat.table:
            print(detail.model_dump_json(indent=2, by_alias=True))  # as the API: `from`
            return
        for name in ("id", "site", "region", "status", "trigger", "tick", "attempts"):
            out.print(f"{name}: {getattr(detail, name)}", highlight=False, markup=False)
        for name in ("queued_at", "started_at", "finished_at"):
            value = getattr(detail, name)
            out.print(f"{name}: {value.isoformat() if value else '-'}", highlight=False)
        out.print(f"worker: {detail.worker or '-'} (egress {detail.egress or '-'})", markup=False)
        if detail.attestation is not None:
            exits = ", ".join(
                f"{e.get('proxy')} from {e.get('address') or '?'}"
                for e in detail.attestation.get("exits", [])
            )
            verified = "verified" if detail.attestation.get("verified") else "unverified"
            out.print(f"exits: {exits or 'direct'} ({verified})", markup=False, highlight=False)
        out.print(f"code: {detail.code_version or '-'}", markup=False, highlight=False)
        out.print(f"stats: {json.dumps(detail.stats, sort_keys=True)}", markup=False)
        out.print(f"limits reached: {', '.join(detail.limits_reached) or 'none'}", markup=False)
        # The error in full, as recorded: never cut.
        out.print(f"error: {detail.error or '-'}", markup=False, highlight=False)
        config = (
            json.dumps(
                detail.config.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True
            )
            if detail.config
            else "-"
        )
        out.print(f"config: {config}", markup=False, highlight=False)

    @app.command()
    def fetches(
        run: RunArg,
        status: Annotated[
            str | None, typer.Option(help="Only this HTTP status or class: 404, 4xx, 5xx.")
        ] = None,
        errors: Annotated[
            bool, typer.Option("--errors", help="Only failed fetches (no response, or >= 400).")
        ] = False,
        format: FormatOption = ViewFormat.table,
    ) -> None:
        """The URLs a run fetched, with status, size and error: what failed, and why."""
        from storage.runinfo import run_fetches
        from storage.validate import check_fetch_status

        check_fetch_status(status)
        with sessions()() as session:
            found = run_fetches(session, run, status=status, errors=errors)
        if format is not ViewFormat.table:
            print(found.model_dump_json(indent=2))
            return
        if not found.fetches:
            out.print(f"no fetches of run {found.run_id} match", highlight=False)
            return
        table = Table(
            "sample", "status", "bytes", "url", "sha256", "block", "error",
            title=f"Fetches of run {found.run_id}",
        )  # fmt: skip
        for f in found.fetches:
            url = f.url if not f.final_url else f"{f.url} -> {f.final_url}"
            table.add_row(
                str(f.sample),
                str(f.status or "-"),
                str(f.bytes),
                url,
                (f.sha256 or "-")[:16],
                f.block or "-",
                f.error or "",
            )
        out.print(table)
