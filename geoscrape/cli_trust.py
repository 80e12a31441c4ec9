"""Evidence commands (issue 14): `geoscrape fetches RUN`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from geoscrape.cli_query import FormatOption, ViewFormat, print_csv
from geoscrape.clikit import out, sessions


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""

    @app.command()
    def fetches(
        run: Annotated[str, typer.Argument(help="The run's id.")],
        format: FormatOption = ViewFormat.table,
    ) -> None:
        """The fetches of RUN: status, bytes, sha256 digest and block signature, per sample."""
        import json

        from storage.evidence import run_fetches

        with sessions()() as session:
            rows = run_fetches(session, run)
        if format is ViewFormat.json:
            out.out(json.dumps([r.model_dump() for r in rows], indent=2), highlight=False)
        elif format is ViewFormat.csv:
            print_csv([r.model_dump() for r in rows])
        else:
            table = Table("sample", "url", "status", "bytes", "sha256", "block", "error")
            for r in rows:
                table.add_row(
                    str(r.sample),
                    r.url + (f" -> {r.final_url}" if r.final_url else ""),
                    "-" if r.status is None else str(r.status),
                    str(r.bytes),
                    (r.sha256 or "-")[:16],
                    r.block or "-",
                    r.error or "",
                )
            out.print(table)
