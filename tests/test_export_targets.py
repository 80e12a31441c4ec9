"""Export targets: the format follows the file name, `-o -` is standard output,
a missing directory or a directory target is one line and exit 2."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq

from storage.export import infer_format
from tests.query_store import build_store, cli


def test_format_inferred_from_the_extension() -> None:
    assert infer_format(Path("y.parquet")) == "parquet"
    assert infer_format(Path("y.PQ")) == "parquet"
    assert infer_format(Path("y.jsonl")) == "jsonl"
    assert infer_format(Path("y.ndjson")) == "jsonl"
    assert infer_format(Path("y.csv")) == "csv"
    assert infer_format(Path("y.txt")) == "csv"
    assert infer_format(Path("y.parquet"), "csv") == "csv"  # --format wins


def test_cli_export_targets(sqlite_url: str, tmp_path: Path) -> None:
    build_store(sqlite_url)
    target = tmp_path / "y.parquet"
    done = cli(sqlite_url, "export", "shop", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert pq.read_table(target).num_rows > 0  # a real Parquet file, not CSV

    done = cli(sqlite_url, "export", "shop", "-o", "-")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("region,key,url")
    assert "rows to standard output" in done.stderr
    assert not Path("-").exists()

    done = cli(sqlite_url, "export", "shop", "-o", str(tmp_path / "no" / "dir" / "x.csv"))
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"error: export: directory {tmp_path}/no/dir does not exist",
    )
    done = cli(sqlite_url, "export", "shop", "-o", str(tmp_path))
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"error: export: {tmp_path} is a directory, not a file",
    )


def test_parquet_to_stdout_reads_back(sqlite_url: str) -> None:
    import subprocess
    import sys

    from tests.query_store import cli_env

    build_store(sqlite_url)
    done = subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", "export", "shop", "-o", "-", "-f", "parquet"],
        env=cli_env(sqlite_url),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(io.BytesIO(done.stdout)).num_rows > 0
