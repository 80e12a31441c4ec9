"""Terminal tables for compare, access, history and changes (json/csv are in cli_query)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from storage.access import AccessResult
from storage.compare import VERDICTS, CompareResult, CompareRow
from storage.history import ChangesResult, HistoryResult

VERDICT_STYLE = {
    "ok": "green",
    "geo-blocked": "red",
    "bot-blocked": "magenta",
    "redirected": "red",
    "blocked-everywhere": "magenta",
    # compare verdicts
    "same": "green",
    "differs": "bold red",
    "noisy": "yellow",
    "missing": "blue",
    "unreachable": "yellow",
    "partial": "yellow",
    "pending": "blue",
}


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _ratio(row: CompareRow, field: str) -> str:
    """max/min, with its currency; one per currency when the regions quote several."""
    spreads = row.spread_by_currency.get(field) or (
        [row.spread[field]] if field in row.spread else []
    )
    parts = [
        f"{s.ratio:.3f}" + (f" {s.currency}" if s.currency else "")
        for s in spreads
        if s.ratio is not None
    ]
    return "; ".join(parts) or "-"


def print_compare(console: Console, result: CompareResult) -> None:
    table = Table("key", title=f"{result.site}: compare ({result.mode})")
    for field in result.fields:
        for region in result.regions:
            table.add_column(f"{field}@{region}")
        if any(s.field == field and s.numeric for s in result.summary):
            table.add_column(f"{field} max/min", justify="right")
        table.add_column(field)
    table.add_column("missing")
    for row in result.rows:
        cells = [row.key]
        for field in result.fields:
            differs = field in row.differs
            for region in result.regions:
                text = cell(row.values[field][region]).replace("[", r"\[")
                cells.append(f"[bold red]{text}[/]" if differs else text)
            if any(s.field == field and s.numeric for s in result.summary):
                cells.append(_ratio(row, field))
            verdict = row.verdicts.get(field, "-")
            cells.append(f"[{VERDICT_STYLE.get(verdict, '')}]{verdict}[/]")
        cells.append(", ".join(row.missing))
        table.add_row(*cells)
    console.print(table)
    runs = ", ".join(f"{r.region}={(r.run_id or '-')[:8]}" for r in result.runs)
    console.print(f"{result.total} keys; runs: {runs}", highlight=False)
    _print_unverified(console, result.unverified, result.verified_only)
    summary = Table("field", "type", *VERDICTS, *(f"missing@{r}" for r in result.regions))
    for s in result.summary:
        summary.add_row(
            s.field,
            s.type,
            *(str(s.counts.get(v, 0)) for v in VERDICTS),
            *(str(s.missing[r]) for r in result.regions),
        )
    console.print(summary)


def _print_unverified(console: Console, regions: list[str], verified_only: bool) -> None:
    if regions:
        console.print(
            f"unverified egress: the rows of {', '.join(regions)} come from runs whose exit "
            "was not verified (--verified-only leaves them out)",
            highlight=False,
            markup=False,
        )
    elif verified_only:
        console.print("verified only: runs with unverified egress left out", highlight=False)


def print_access(console: Console, result: AccessResult) -> None:
    table = Table("region", title=f"{result.site}: access verdicts (newest round first)")
    for rnd in result.rounds:
        table.add_column(f"{rnd.round[:19]}\n{_when(rnd.at)}")
    for i, region in enumerate(result.regions):
        cells = [region]
        for rnd in result.rounds:
            c = rnd.cells[i]
            style = VERDICT_STYLE.get(c.verdict, "")
            codes = " ".join(f"{k}x{v}" for k, v in c.statuses.items())
            label = c.label.replace("[", r"\[")
            cells.append(f"[{style}]{label}[/]\n{codes}")
        table.add_row(*cells)
    console.print(table)
    _print_unverified(console, result.unverified, result.verified_only)
    for rnd in result.rounds[:1]:
        for c in rnd.cells:
            console.print(f"{c.region}: {c.label}: {c.reason}", highlight=False, markup=False)
            for e in c.evidence:
                console.print(
                    f"  {e.why}: {e.url}" + (f" -> {e.final_url}" if e.final_url else ""),
                    highlight=False,
                    markup=False,
                )


def print_history(console: Console, result: HistoryResult) -> None:
    table = Table("region", "from", "to", "runs", "value", title=f"{result.site}: {result.key}")
    for e in result.entries:
        value = (
            ("absent" if not e.seen else "")
            if e.values is None
            else ", ".join(f"{k}={cell(v)}" for k, v in e.values.items())
        )
        table.add_row(e.region, _when(e.first_at), _when(e.last_at), str(e.runs), value)
    console.print(table, markup=False)


def print_changes(console: Console, result: ChangesResult) -> None:
    if not result.changes:
        console.print(f"no changes since {_when(result.since)}")
        return
    table = Table("region", "when", "key", "change", "fields", "before", "after")
    for c in result.changes:
        fields = c.fields if c.change == "changed" else []
        table.add_row(
            c.region,
            _when(c.at),
            c.key,
            c.change,
            ", ".join(fields),
            ", ".join(cell((c.before or {}).get(f)) for f in fields),
            ", ".join(cell((c.after or {}).get(f)) for f in fields),
        )
    console.print(table)
    console.print(f"{result.total} changes since {_when(result.since)}")
