"""Query commands over the store (issue 5): compare, access, history, changes, export, api.

Each command calls one function of the storage query layer; `--format json`
prints exactly the model the HTTP API returns for the same query.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from geoscrape.clikit import err, out, sessions


class ViewFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class ExportKind(enum.StrEnum):
    items = "items"
    observations = "observations"
    compare = "compare"
    warc = "warc"  # a run's kept response bodies (--run RUN; keep_bodies: true)


class ExportFormat(enum.StrEnum):
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


FieldOption = Annotated[
    list[str] | None, typer.Option("--field", help="Only this field (repeatable).")
]
FormatOption = Annotated[ViewFormat, typer.Option("--format", "-f")]
VerifiedOnlyOption = Annotated[
    bool,
    typer.Option("--verified-only", help="Leave out runs whose egress was not verified."),
]
SiteArg = Annotated[str, typer.Argument(help="The site's name.")]


def print_json(model: BaseModel) -> None:
    out.out(json.dumps(model.model_dump(mode="json"), indent=2, ensure_ascii=False))


def print_csv(rows: list[dict[str, Any]]) -> None:
    from storage.export import write_csv

    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    write_csv(out.file, list(names), rows)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""

    @app.command()
    def compare(
        site: SiteArg,
        field: FieldOption = None,
        run_tick: Annotated[
            str | None, typer.Option("--run-tick", help="Compare the runs of this tick.")
        ] = None,
        latest: Annotated[
            bool, typer.Option("--latest", help="Each region's latest succeeded run (default).")
        ] = False,
        only_diff: Annotated[
            bool, typer.Option("--only-diff", help="Only keys that differ or are missing.")
        ] = False,
        format: FormatOption = ViewFormat.table,
        verified_only: VerifiedOnlyOption = False,
    ) -> None:
        """Compare SITE across regions: one row per key, one column per region per field."""
        from geoscrape.query_views import print_compare
        from storage.compare import compare as run_compare
        from storage.compare import compare_record
        from storage.errors import QueryError

        if latest and run_tick is not None:
            raise QueryError("give either --run-tick or --latest, not both")
        with sessions()() as session:
            result = run_compare(
                session,
                site,
                fields=field,
                tick=run_tick,
                only_diff=only_diff,
                verified_only=verified_only,
            )
        if format is ViewFormat.json:
            print_json(result)
        elif format is ViewFormat.csv:
            print_csv([compare_record(r, result.fields, result.regions) for r in result.rows])
        else:
            print_compare(out, result)

    @app.command()
    def access(
        site: SiteArg,
        rounds: Annotated[int, typer.Option(min=1, help="Newest rounds of runs to show.")] = 5,
        region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
        format: FormatOption = ViewFormat.table,
        verified_only: VerifiedOnlyOption = False,
    ) -> None:
        """Access verdicts of SITE per region and round: ok, geo-blocked, blocked-everywhere..."""
        from geoscrape.query_views import print_access
        from storage.access import access as run_access

        with sessions()() as session:
            result = run_access(
                session, site, rounds=rounds, region=region, verified_only=verified_only
            )
        if format is ViewFormat.json:
            print_json(result)
        elif format is ViewFormat.csv:
            print_csv(
                [
                    {"round": r.round, "at": r.at, **c.model_dump(exclude={"evidence"})}
                    for r in result.rounds
                    for c in r.cells
                ]
            )
        else:
            print_access(out, result)

    @app.command()
    def history(
        site: SiteArg,
        key: Annotated[str, typer.Argument(help="The item's key.")],
        region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
        field: FieldOption = None,
        format: FormatOption = ViewFormat.table,
    ) -> None:
        """The values of one item of SITE over time, per region."""
        from geoscrape.query_views import print_history
        from storage.history import history as run_history

        with sessions()() as session:
            result = run_history(session, site, key, region=region, fields=field)
        if format is ViewFormat.json:
            print_json(result)
        elif format is ViewFormat.csv:
            print_csv([e.model_dump() for e in result.entries])
        else:
            print_history(out, result)

    @app.command()
    def changes(
        site: SiteArg,
        since: Annotated[str, typer.Option(help="30m, 12h, 1d, 2w ago, or an ISO time.")] = "1d",
        region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
        format: FormatOption = ViewFormat.table,
    ) -> None:
        """Items of SITE that appeared, changed or vanished since a time, per region."""
        from geoscrape.query_views import print_changes
        from storage.history import changes as run_changes
        from storage.since import parse_since

        when = parse_since(since, what="since")
        with sessions()() as session:
            result = run_changes(session, site, when, region=region)
        if format is ViewFormat.json:
            print_json(result)
        elif format is ViewFormat.csv:
            print_csv([c.model_dump() for c in result.changes])
        else:
            print_changes(out, result)

    @app.command()
    def export(
        site: SiteArg,
        output: Annotated[
            Path, typer.Option("--output", "-o", help="The file to write; - for stdout.")
        ],
        format: Annotated[
            ExportFormat | None,
            typer.Option("--format", "-f", help="Default: from the file name, else csv."),
        ] = None,
        kind: Annotated[
            ExportKind, typer.Option("--kind", "-k", help="What to export.")
        ] = ExportKind.items,
        region: Annotated[str | None, typer.Option(help="Only this region.")] = None,
        since: Annotated[
            str | None, typer.Option(help="Only rows seen since: 1d, 12h or an ISO time.")
        ] = None,
        field: FieldOption = None,
        run_tick: Annotated[
            str | None, typer.Option("--run-tick", help="compare: the runs of this tick.")
        ] = None,
        only_diff: Annotated[
            bool, typer.Option("--only-diff", help="compare: only diffs.")
        ] = False,
        run: Annotated[
            str | None, typer.Option("--run", help="warc: the run whose responses to write.")
        ] = None,
    ) -> None:
        """Stream SITE's items, observations or compare to a CSV, JSONL or Parquet file,
        or one run's kept responses to a WARC file (--kind warc --run RUN)."""
        from storage.errors import QueryError
        from storage.export import STDOUT, infer_format
        from storage.export import export as run_export
        from storage.since import parse_since

        if kind is ExportKind.warc:
            from storage.evidence import write_warc

            if run is None:
                raise QueryError("export --kind warc needs --run RUN")
            with sessions()() as session:
                records = write_warc(session, site, run, output)
            err.print(f"wrote {records} WARC records to {output}", highlight=False)
            return
        if run is not None:
            raise QueryError("export: --run applies to --kind warc only")

        when = parse_since(since, what="since") if since is not None else None
        with sessions()() as session:
            count = run_export(
                session,
                site,
                output,
                kind=kind.value,
                fmt=infer_format(output, format.value if format else None),
                region=region,
                since=when,
                fields=field,
                tick=run_tick,
                only_diff=only_diff,
            )
        where = "standard output" if output == STDOUT else str(output)
        err.print(f"wrote {count} {kind.value} rows to {where}", highlight=False)

    @app.command()
    def api(
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    ) -> None:
        """Serve the read-only HTTP API (OpenAPI docs at /docs; token: GEOSCRAPE_API_TOKEN)."""
        from dashboard import mount as mount_dashboard
        from geoscrape.clikit import database_url
        from storage.api import create_app, serve

        app_ = create_app(database_url())
        mount_dashboard(app_)  # the web UI at / and /metrics (docs/DASHBOARD.md)
        serve(app_, host, port)
