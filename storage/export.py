"""Streaming exports of items, observations and compares to CSV, JSON Lines or Parquet.

Rows are read with server-side cursors (``yield_per``) and written as they
come: CSV and JSONL line by line, Parquet in row groups of ROW_GROUP rows, so
memory stays flat whatever the row count. The file is written beside its
target and renamed into place at the end: a failed export leaves no half file.

Columns: fixed ones first (``region, key, url, ...``), then one column per
data field, typed from the site's config snapshot (``price``/``float`` ->
float64, ``int`` -> int64, else string; values that are not scalars are JSON
text in CSV and Parquet). A compare has ``FIELD.REGION`` columns and, for
numeric fields, ``FIELD.min``, ``FIELD.max``, ``FIELD.ratio``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.compare import Comparison, compare_record
from storage.errors import QueryError
from storage.models import contents, items, observations
from storage.snapshots import STREAM_CHUNK, declared_fields, require_site, site_config

ExportKind = Literal["items", "observations", "compare"]
ExportFormat = Literal["csv", "jsonl", "parquet"]
KINDS: tuple[str, ...] = ("items", "observations", "compare")
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
ROW_GROUP = 10_000

ITEM_COLUMNS = {
    "region": "string",
    "key": "string",
    "url": "string",
    "first_seen_at": "timestamp",
    "last_seen_at": "timestamp",
    "last_run_id": "string",
}
OBSERVATION_COLUMNS = {
    "region": "string",
    "key": "string",
    "url": "string",
    "run_id": "string",
    "observed_at": "timestamp",
}
_TYPE_OF = {"price": "float", "float": "float", "int": "int", "number": "float"}


@dataclass(frozen=True)
class Table:
    """What an export writes: typed columns and a stream of records."""

    columns: dict[str, str]  # name -> string | float | int | bool | timestamp
    records: Iterator[dict[str, Any]]


def _column_name(name: str, taken: dict[str, str]) -> str:
    return name if name not in taken else f"data.{name}"


def _data_columns(
    session: Session, site: str, fixed: dict[str, str], fields: Sequence[str] | None
) -> dict[str, str]:
    declared, _ = declared_fields(site_config(session, site))
    names = list(fields or declared) or _observed_fields(session, site)
    return {name: _TYPE_OF.get(declared.get(name, "str"), "string") for name in names}


def _observed_fields(session: Session, site: str) -> list[str]:
    stmt = (
        select(items.c.data).where(items.c.site == site).execution_options(yield_per=STREAM_CHUNK)
    )
    names: dict[str, None] = {}
    for (data,) in session.execute(stmt):
        names.update(dict.fromkeys(data))
    return list(names)


def _with_fields(
    fixed: dict[str, str], data_cols: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(all columns, data field -> its column name)."""
    columns = dict(fixed)
    renamed: dict[str, str] = {}
    for name, kind in data_cols.items():
        col = _column_name(name, columns)
        columns[col] = kind
        renamed[name] = col
    return columns, renamed


def items_table(
    session: Session,
    site: str,
    region: str | None = None,
    since: datetime | None = None,
    fields: Sequence[str] | None = None,
) -> Table:
    require_site(session, site)
    columns, renamed = _with_fields(
        ITEM_COLUMNS, _data_columns(session, site, ITEM_COLUMNS, fields)
    )
    stmt = select(
        items.c.region,
        items.c.key,
        items.c.url,
        items.c.first_seen_at,
        items.c.last_seen_at,
        items.c.last_run_id,
        items.c.data,
    ).where(items.c.site == site)
    if region is not None:
        stmt = stmt.where(items.c.region == region)
    if since is not None:
        stmt = stmt.where(items.c.last_seen_at >= since)
    stmt = stmt.order_by(items.c.region, items.c.key).execution_options(yield_per=STREAM_CHUNK)

    def records() -> Iterator[dict[str, Any]]:
        for row in session.execute(stmt):
            record = {name: getattr(row, name) for name in ITEM_COLUMNS}
            record.update({col: row.data.get(f) for f, col in renamed.items()})
            yield record

    return Table(columns, records())


def observations_table(
    session: Session,
    site: str,
    region: str | None = None,
    since: datetime | None = None,
    fields: Sequence[str] | None = None,
) -> Table:
    require_site(session, site)
    columns, renamed = _with_fields(
        OBSERVATION_COLUMNS, _data_columns(session, site, OBSERVATION_COLUMNS, fields)
    )
    stmt = (
        select(
            observations.c.region,
            observations.c.key,
            observations.c.url,
            observations.c.run_id,
            observations.c.observed_at,
            contents.c.data,
        )
        .join(contents, contents.c.hash == observations.c.content_hash)
        .where(observations.c.site == site)
    )
    if region is not None:
        stmt = stmt.where(observations.c.region == region)
    if since is not None:
        stmt = stmt.where(observations.c.observed_at >= since)
    stmt = stmt.order_by(observations.c.observed_at, observations.c.id).execution_options(
        yield_per=STREAM_CHUNK
    )

    def records() -> Iterator[dict[str, Any]]:
        for row in session.execute(stmt):
            record = {name: getattr(row, name) for name in OBSERVATION_COLUMNS}
            record.update({col: row.data.get(f) for f, col in renamed.items()})
            yield record

    return Table(columns, records())


def compare_table(
    session: Session,
    site: str,
    fields: Sequence[str] | None = None,
    tick: str | None = None,
    only_diff: bool = False,
    region: str | None = None,
) -> Table:
    cmp = Comparison(
        session,
        site,
        fields=fields,
        tick=tick,
        only_diff=only_diff,
        regions=[region] if region else None,
    )
    columns: dict[str, str] = dict.fromkeys(("key", "missing", "differs", "noisy"), "string")
    for field in cmp.fields:
        kind = _TYPE_OF.get(cmp.declared.get(field, "str"), "string")
        for reg in cmp.regions:
            columns[f"{field}.{reg}"] = kind
        if kind in ("float", "int"):
            columns.update(
                {f"{field}.min": "float", f"{field}.max": "float", f"{field}.ratio": "float"}
            )
        columns[f"{field}.verdict"] = "string"  # same | differs | noisy | missing

    def records() -> Iterator[dict[str, Any]]:
        ranged = {field for field in cmp.fields if f"{field}.min" in columns}
        for row in cmp.rows():
            yield compare_record(row, cmp.fields, cmp.regions, ranged)

    return Table(columns, records())


# --- writers ------------------------------------------------------------------


def _scalar(value: Any, kind: str) -> Any:
    """A value as a typed column holds it (None when it does not fit)."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if kind == "float" else int(value)
    return value


def csv_cell(value: Any) -> str:
    """One CSV cell, the same from `export` and every `--format csv` of the CLI:
    empty for None, ISO 8601 times, JSON for booleans, lists and objects."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool | dict | list | tuple):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def write_csv(fh: IO[str], columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """The one CSV writer: a header of `columns`, then each row's cells in that order
    (keys a row lacks are empty, keys outside `columns` left out). Returns the row count."""
    writer = csv.writer(fh)
    writer.writerow(columns)
    n = 0
    for row in rows:
        writer.writerow([csv_cell(row.get(name)) for name in columns])
        n += 1
    return n


def _write_csv(table: Table, path: Path) -> int:
    with path.open("w", newline="", encoding="utf-8") as fh:
        return write_csv(
            fh,
            list(table.columns),
            (
                {
                    name: value if kind == "timestamp" else _scalar(value, kind)
                    for name, kind in table.columns.items()
                    if (value := record.get(name)) is not None
                }
                for record in table.records
            ),
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_jsonl(table: Table, path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in table.records:
            fh.write(json.dumps(record, default=_json_default, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


def _write_parquet(table: Table, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_types = {
        "string": pa.string(),
        "float": pa.float64(),
        "int": pa.int64(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }
    schema = pa.schema([(name, arrow_types[kind]) for name, kind in table.columns.items()])
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: dict[str, list[Any]] = {name: [] for name in table.columns}
        size = 0

        def flush() -> None:
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))
            for col in batch.values():
                col.clear()

        for record in table.records:
            for name, kind in table.columns.items():
                value = record.get(name)
                batch[name].append(value if kind == "timestamp" else _scalar(value, kind))
            size += 1
            n += 1
            if size == ROW_GROUP:
                flush()
                size = 0
        if size or n == 0:
            flush()
    return n


WRITERS = {"csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet}
SUFFIXES = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
STDOUT = Path("-")  # `-o -`: write to standard output


def infer_format(path: Path, fmt: str | None = None) -> str:
    """The format asked for, else the one the file name says (`.parquet`...), else csv."""
    if fmt is not None:
        return fmt
    return SUFFIXES.get(Path(path).suffix.lower(), "csv")


def _check_target(path: Path) -> None:
    if path == STDOUT:
        return
    if path.is_dir():
        raise QueryError(f"export: {path} is a directory, not a file")
    if not path.parent.is_dir():
        raise QueryError(f"export: directory {path.parent} does not exist")


def _to_stdout(write: Callable[[Table, Path], int], table: Table) -> int:
    """Write to a private temporary file, then copy it out: nothing half-written on error."""
    with tempfile.TemporaryDirectory(prefix="geoscrape-export-") as tmp:
        partial = Path(tmp) / "export"
        count = write(table, partial)
        with partial.open("rb") as fh:
            shutil.copyfileobj(fh, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return count


def export(
    session: Session,
    site: str,
    path: Path,
    kind: str = "items",
    fmt: str = "csv",
    region: str | None = None,
    since: datetime | None = None,
    fields: Sequence[str] | None = None,
    tick: str | None = None,
    only_diff: bool = False,
) -> int:
    """Write the export to ``path`` (atomically; ``-``: standard output); returns the row count."""
    if kind not in KINDS:
        raise QueryError(f"export: unknown kind {kind!r} (one of: {', '.join(KINDS)})")
    if fmt not in FORMATS:
        raise QueryError(f"export: unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    path = Path(path)
    _check_target(path)
    if kind == "compare":
        if since is not None:
            raise QueryError("export: --since does not apply to a compare (use --tick)")
        table = compare_table(session, site, fields, tick=tick, only_diff=only_diff, region=region)
    elif kind == "items":
        table = items_table(session, site, region=region, since=since, fields=fields)
    else:
        table = observations_table(session, site, region=region, since=since, fields=fields)
    if path == STDOUT:
        return _to_stdout(WRITERS[fmt], table)
    partial = path.with_name(f".{path.name}.partial")
    try:
        count = WRITERS[fmt](table, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count
