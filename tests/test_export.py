"""Streaming exports: 100,000 rows to CSV, JSONL and Parquet read back (pyarrow) equal the rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from sqlalchemy.orm import Session

from regions.messages import ItemBatch, Job, RunFinished, RunQueued, RunStats, ScrapedItem
from storage.db import make_engine, session_factory
from storage.errors import NotFoundError, QueryError
from storage.export import export
from storage.migrate import ensure_schema
from storage.writer import apply_message
from tests.query_store import CONFIG, build_store, cli

pytestmark = pytest.mark.slow

T0 = datetime(2024, 6, 1, tzinfo=UTC)
PER_REGION = 50_000
REGIONS = ("eu", "us")
BATCH = 5_000
COLUMNS = ["region", "key", "url", "first_seen_at", "last_seen_at", "last_run_id", "sku",
           "name", "price"]  # fmt: skip


def item_data(n: int, region: str) -> dict[str, Any]:
    # commas, quotes, newlines and non-ASCII exercise the CSV quoting; every 97th has no price
    name = f'Item {n}, "größe" {region}' + ("\nline two" if n % 1000 == 0 else "")
    price = None if n % 97 == 0 else round(n * 0.37 + (1.5 if region == "us" else 0), 2)
    return {"sku": f"K{n:06d}", "name": name, "price": price}


def expected_rows() -> list[dict[str, Any]]:
    rows = []
    for i, region in enumerate(REGIONS):
        at = T0 + timedelta(minutes=i)
        for n in range(PER_REGION):
            d = item_data(n, region)
            rows.append({"region": region, "key": d["sku"], "url": f"https://s.example/{n}",
                         "first_seen_at": at, "last_seen_at": at, "last_run_id": f"big-{region}",
                         **d})  # fmt: skip
    return rows


@pytest.fixture
def big_store(db_url: str) -> Iterator[Session]:
    ensure_schema(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    for i, region in enumerate(REGIONS):
        run = f"big-{region}"
        at = T0 + timedelta(minutes=i)
        job = Job(
            run_id=run, site="big", region=region, config=CONFIG.model_copy(update={"name": "big"})
        )
        with factory.begin() as s:
            apply_message(s, RunQueued(run_id=run, site="big", region=region, queued_at=at,
                                       job=job))  # fmt: skip
        for seq, start in enumerate(range(0, PER_REGION, BATCH)):
            items = [
                ScrapedItem(
                    key=f"K{n:06d}", url=f"https://s.example/{n}", data=item_data(n, region)
                )
                for n in range(start, start + BATCH)
            ]
            with factory.begin() as s:
                apply_message(s, ItemBatch(run_id=run, site="big", region=region, seq=seq,
                                           observed_at=at, items=items))  # fmt: skip
        with factory.begin() as s:
            done = RunFinished(
                run_id=run, site="big", region=region, status="succeeded", finished_at=at,
                stats=RunStats(),
            )  # fmt: skip
            apply_message(s, done)
    with factory() as s:
        yield s
    engine.dispose()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def test_100k_items_to_each_format_read_back_equal(big_store: Session, tmp_path: Path) -> None:
    rows = expected_rows()
    assert len(rows) == 100_000

    parquet = tmp_path / "items.parquet"
    assert export(big_store, "big", parquet, fmt="parquet") == 100_000
    table = pq.read_table(parquet)
    assert table.schema.field("price").type == pa.float64()
    assert table.schema.field("first_seen_at").type == pa.timestamp("us", tz="UTC")
    assert pq.ParquetFile(parquet).num_row_groups == 10  # written in row groups, not at once
    assert table.to_pylist() == rows

    jsonl = tmp_path / "items.jsonl"
    assert export(big_store, "big", jsonl, fmt="jsonl") == 100_000
    schema = pa.schema([(c, pa.float64() if c == "price" else pa.string()) for c in COLUMNS])
    back = pajson.read_json(jsonl, parse_options=pajson.ParseOptions(explicit_schema=schema))
    assert back.column_names == COLUMNS
    assert back.to_pylist() == [
        {**r, "first_seen_at": r["first_seen_at"].isoformat(),
         "last_seen_at": r["last_seen_at"].isoformat()}
        for r in rows
    ]  # fmt: skip

    csv_file = tmp_path / "items.csv"
    assert export(big_store, "big", csv_file, fmt="csv") == 100_000
    as_text = pacsv.ConvertOptions(
        column_types=dict.fromkeys(COLUMNS, pa.string()), strings_can_be_null=False
    )
    back = pacsv.read_csv(
        csv_file,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=as_text,
    )
    assert back.column_names == COLUMNS
    assert back.to_pylist() == [{k: _csv_value(v) for k, v in r.items()} for r in rows]

    # filters and the other kinds, on the same store
    out = tmp_path / "us.parquet"
    assert export(big_store, "big", out, kind="observations", fmt="parquet", region="us") == 50_000
    obs = pq.read_table(out)
    assert obs.column_names == ["region", "key", "url", "run_id", "observed_at", "sku", "name",
                                "price"]  # fmt: skip
    assert set(obs.column("run_id").to_pylist()) == {"big-us"}
    late = tmp_path / "late.jsonl"
    assert export(big_store, "big", late, fmt="jsonl", since=T0 + timedelta(seconds=30)) == 50_000

    cmp = tmp_path / "compare.parquet"
    assert export(big_store, "big", cmp, kind="compare", fmt="parquet") == 50_000
    first = pq.read_table(cmp).slice(1, 1).to_pylist()
    assert first == [{"key": "K000001", "missing": "", "differs": "name,price", "noisy": "",
                      "name.eu": item_data(1, "eu")["name"], "name.us": item_data(1, "us")["name"],
                      "name.verdict": "differs",
                      "price.eu": 0.37, "price.us": 1.87, "price.min": 0.37, "price.max": 1.87,
                      "price.ratio": round(1.87 / 0.37, 6),
                      "price.verdict": "differs"}]  # fmt: skip


def test_bad_export_requests(sqlite_url: str, tmp_path: Path) -> None:
    build_store(sqlite_url)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    engine = make_engine(sqlite_url)
    try:
        with session_factory(engine)() as s:
            with pytest.raises(NotFoundError, match="unknown site 'nope'"):
                export(s, "nope", tmp_path / "x.csv")
            with pytest.raises(QueryError, match="unknown format 'xls'"):
                export(s, "shop", tmp_path / "x.xls", fmt="xls")
            with pytest.raises(QueryError, match="--since does not apply to a compare"):
                export(s, "shop", tmp_path / "x.csv", kind="compare", since=T0)
    finally:
        engine.dispose()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_cli_export_of_the_known_store(sqlite_url: str, tmp_path: Path) -> None:
    build_store(sqlite_url)
    target = tmp_path / "cmp.jsonl"
    done = cli(sqlite_url, "export", "shop", "--kind", "compare", "-f", "jsonl", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"wrote 3 compare rows to {target}"
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows[1] == {"key": "B", "missing": "asia", "differs": "price", "noisy": "",
                       "name.asia": None, "name.eu": "Beta", "name.us": "Beta",
                       "name.verdict": "missing",
                       "price.asia": None, "price.eu": 20.0, "price.us": 25.0,
                       "price.min": 20.0, "price.max": 25.0, "price.ratio": 1.25,
                       "price.verdict": "differs"}  # fmt: skip
    obs = tmp_path / "obs.csv"
    done = cli(sqlite_url, "export", "shop", "-k", "observations", "--region", "us",
               "--since", "2024-05-02", "-o", str(obs))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert obs.read_text().splitlines() == [
        "region,key,url,run_id,observed_at,sku,name,price",
        "us,A,https://shop.example/p/A,t2-us,2024-05-02T12:02:00+00:00,A,Alpha,10.0",
        "us,B,https://shop.example/p/B,t2-us,2024-05-02T12:02:00+00:00,B,Beta,25.0",
    ]


def test_the_cli_and_export_write_the_same_csv(sqlite_url: str, tmp_path: Path) -> None:
    """One CSV writer (storage.export.write_csv): `compare --format csv` prints the
    bytes `export --kind compare` writes."""
    build_store(sqlite_url)
    target = tmp_path / "cmp.csv"
    done = cli(sqlite_url, "export", "shop", "--kind", "compare", "-o", str(target))
    assert done.returncode == 0, done.stderr
    printed = cli(sqlite_url, "compare", "shop", "--format", "csv")
    assert printed.returncode == 0, printed.stderr
    # Export's columns are fixed by the declared types (min/max/ratio for every
    # number), the CLI's by the rows: the same records, cell for cell.
    exported = list(csv.DictReader(io.StringIO(target.read_text())))
    shown = list(csv.DictReader(io.StringIO(printed.stdout)))
    assert len(shown) == len(exported) == 3
    for cli_row, export_row in zip(shown, exported, strict=True):
        assert cli_row == {k: v for k, v in export_row.items() if k in cli_row}
    assert printed.stdout.splitlines()[0].startswith("key,missing,differs,noisy,")
