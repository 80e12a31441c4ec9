"""Global CLI options: --version, --log-level, --log-file, --log-format json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from geoscrape import __version__


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version() -> None:
    done = run("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"geoscrape {__version__}")


def test_json_logs_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "geoscrape.log"
    url = f"sqlite:///{tmp_path}/g.db"
    done = run(
        "--log-level", "debug", "--log-format", "json", "--log-file", str(log), "db", "upgrade",
        env={"GEOSCRAPE_DATABASE_URL": url},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records, "nothing logged"
    assert {"time", "level", "logger", "message", "pid"} <= set(records[0])
    assert any(r["logger"].startswith("alembic") for r in records)  # debug: alembic's steps too
    assert "alembic" not in done.stderr  # the logs went to the file


def test_a_log_file_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    done = run("--log-file", str(tmp_path / "no" / "x.log"), "schedule")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: --log-file {tmp_path}/no/x.log: directory {tmp_path}/no does not exist"
    )
