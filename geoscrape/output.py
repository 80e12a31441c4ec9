"""Rendering query results for the terminal and for other programs."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # rows only annotate: the store's modules load per command
    from storage.queries import ItemRow, RunRow


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    jsonl = "jsonl"


STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "degraded": "magenta",
    "running": "yellow",
    "queued": "blue",
    "cancelled": "dim",
}


def redact_db(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _duration(run: RunRow) -> str:
    if run.started_at and run.finished_at:
        return f"{(run.finished_at - run.started_at).total_seconds():.1f}s"
    return "-"


def _run_record(run: RunRow) -> dict[str, Any]:
    record = run.model_dump()
    record["verified"] = run.verified
    return record


def print_runs(console: Console, runs: Sequence[RunRow], fmt: Format = Format.table) -> None:
    if fmt in (Format.json, Format.jsonl):
        records = [_run_record(r) for r in runs]
        if fmt is Format.json:
            console.out(json.dumps(records, default=str, indent=2), highlight=False)
        for record in records if fmt is Format.jsonl else []:
            console.out(json.dumps(record, default=str), highlight=False)
        return
    if fmt is Format.csv:
        from storage.export import write_csv

        fields = ["id", "site", "region", "status", "queued_at", "finished_at", "verified", "error"]
        write_csv(console.file, fields, (_run_record(r) for r in runs))
        return
    if not runs:
        console.print("no runs")
        return
    table = Table("run", "site", "region", "trigger", "status", "queued", "took", "egress")
    for name in ("pages", "items", "errors", "code", "error"):
        table.add_column(name, justify="left" if name in ("code", "error") else "right")
    for run in runs:
        stats = run.stats or {}
        style = STATUS_STYLE.get(run.status, "")
        table.add_row(
            run.id[:8],
            run.site,
            run.region,
            run.trigger,
            f"[{style}]{run.status}[/]" if style else run.status,
            _when(run.queued_at),
            _duration(run),
            _egress(run),
            str(stats.get("pages", 0)),
            str(stats.get("items", 0)),
            str(stats.get("errors", 0)),
            run.code_version or "",
            (run.error or "")[:60],
        )
    console.print(table)


def _fields(items: Sequence[ItemRow]) -> list[str]:
    names: dict[str, None] = {}
    for item in items:
        names.update(dict.fromkeys(item.data))
    return list(names)


def _record(item: ItemRow) -> dict[str, Any]:
    return {"region": item.region, "key": item.key, "url": item.url, **item.data}


def print_items(console: Console, items: Sequence[ItemRow], fmt: Format) -> None:
    if fmt is Format.json:
        console.out(json.dumps([_record(i) for i in items], default=str, indent=2))
    elif fmt is Format.jsonl:
        for item in items:
            console.out(json.dumps(_record(item), default=str), highlight=False)
    elif fmt is Format.csv:
        from storage.export import write_csv

        write_csv(console.file, ["region", "key", "url", *_fields(items)], map(_record, items))
    else:
        if not items:
            console.print("no items")
            return
        fields = [f for f in _fields(items) if f != "key"]
        table = Table("region", "key", *fields)
        for item in items:
            table.add_row(item.region, item.key, *(_cell(item.data.get(f)) for f in fields))
        console.print(table)
        console.print(f"{len(items)} items")


def _egress(run: RunRow) -> str:
    """`verified`, `unverified`, or `-` for a run from before attestation."""
    if run.egress is None:
        return "-"
    return "verified" if run.verified else "unverified"


def _cell(value: Any) -> str:
    return "" if value is None else str(value)
