"""Hostile input at the boundaries: the API, the CLI's filters and the YAML loader.

Every case here once ended in a 500, a traceback or minutes of CPU (issue 11).
The API runs as a real `geoscrape api` process over a store filled by ingest.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scheduler.loader import ConfigError, parse_config
from tests.query_store import api_server, build_store, cli, cli_env

pytestmark = pytest.mark.slow

BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "regions: {eu: {}}",
    ]
)


# Runs a command and prints its peak RSS (KiB) as the last line of stderr. A
# fresh, small process forks the command: ru_maxrss of a child forked straight
# from pytest would count pytest's own memory, which the fork shares until exec.
_PEAK = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss, file=sys.stderr)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _check_costs(path: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `geoscrape check PATH`; return the result and that process's peak RSS (KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, "-m", "geoscrape.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    *err, peak = done.stderr.rstrip("\n").split("\n")
    result = subprocess.CompletedProcess(done.args, done.returncode, done.stdout, "\n".join(err))
    return result, int(peak)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BILLION_LAUGHS, "expands to more than 100,000 values"),
        ("regions: " + "[" * 1000 + "]" * 1000, "nested deeper than 64 levels"),
    ],
    ids=["billion-laughs", "deep-nesting"],
)
def test_yaml_bombs_are_one_line_fast_and_small(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(text)
    done, peak_kib = _check_costs(path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{path}:") and message in lines[0], lines
    assert "Traceback" not in done.stderr
    # The bounds: under 200 MB peak RSS for the whole `geoscrape check`, and
    # under 1 s for the loader's own work. That is CPU time measured in this
    # process: the interpreter's start-up and imports (about 2 s of CPU here, and
    # more on a busy machine) are not the loader's.
    started = time.process_time()
    with pytest.raises(ConfigError) as refused:
        parse_config(text, str(path))
    work = time.process_time() - started
    print(f"check: loader {work:.2f} s CPU, process peak {peak_kib} KiB")
    assert message in str(refused.value)
    assert work < 1.0, work
    assert peak_kib < 200 * 1024, peak_kib


def test_an_oversized_config_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text("regions: {eu: {}}\n" + "# padding\n" * 500_000)
    done, _ = _check_costs(path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"{path}: the config is 5,000,018 characters; the limit is 4,194,304"
    )


# (path, params, status, message fragment): each was a 500 or a wrong status before.
API_CASES = [
    ("/sites", {"offset": str(2**63)}, 400, "offset: Input should be less than or equal to"),
    ("/runs", {"offset": str(2**64)}, 400, "offset: Input should be less than or equal to"),
    ("/sites/shop/items", {"offset": "9223372036854775808"}, 400, "offset"),
    ("/runs", {"since": "1000000d"}, 400, "since: '1000000d' reaches before the year 1"),
    (
        "/runs",
        {"until": "9999-12-31T23:59:59-05:00"},
        400,
        "until: '9999-12-31T23:59:59-05:00' is outside the years 1 to 9999 in UTC",
    ),
    ("/sites/shop/changes", {"since": "99999999999d"}, 400, "reaches before the year 1"),
    ("/sites/%00/items", {}, 400, "NUL characters are not allowed"),
    ("/runs", {"site": "\x00"}, 400, "NUL characters are not allowed"),
    ("/sites/nope/items", {"offset": "5"}, 404, "nope"),
    ("/sites/nope/items", {"offset": "0"}, 404, "nope"),
    ("/sites/shop/compare", {"field": [f"f{i}" for i in range(101)]}, 400, "field"),
]


def test_api_bounds_every_parameter(db_url: str) -> None:
    build_store(db_url)
    with api_server(db_url) as base:
        for path, params, status, fragment in API_CASES:
            response = requests.get(base + path, params=params, timeout=30)
            assert response.status_code == status, (path, params, response.text)
            assert fragment in response.json()["error"], (path, params, response.text)

        # 405 names the allowed methods; HEAD is answered wherever GET is.
        response = requests.post(base + "/runs", timeout=30)
        assert response.status_code == 405 and "GET" in response.headers["allow"], response
        assert response.json() == {"error": "Method Not Allowed"}
        head = requests.head(base + "/runs", timeout=30)
        assert head.status_code == 200 and head.content == b""
        assert requests.head(base + "/sites/nope/items", timeout=30).status_code == 404

        # The document says what the API answers: 400 with {"error"}, never FastAPI's 422.
        schema = requests.get(base + "/openapi.json", timeout=30).json()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                assert "422" not in operation["responses"], (method, path)
                if operation.get("parameters"):
                    assert "400" in operation["responses"] or "400" in str(schema), path


def test_cli_filters_out_of_range_are_one_line(sqlite_url: str, tmp_path: Path) -> None:
    build_store(sqlite_url)
    done = cli(sqlite_url, "changes", "shop", "--since", "1000000d")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip() == "error: since: '1000000d' reaches before the year 1"
    # A usage error: click's own message, still no traceback.
    done = cli(sqlite_url, "runs", "--limit", "99999999999999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--limit" in done.stderr and "100000" in done.stderr, done.stderr


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_schemathesis_finds_no_server_error(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """schemathesis with every check against a real API process: 0 failures."""
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    build_store(url)
    st = Path(sys.executable).with_name("st")
    with api_server(url) as base:
        done = subprocess.run(
            [
                str(st), "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
                "run", f"{base}/openapi.json",
                "--checks", "all",
                "--max-examples", "10",
                "--seed", "1",
                "--no-color",
                "--report-dir", str(tmp_path / "st-report"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**cli_env(url), "SCHEMATHESIS_HOOKS": ""},
        )  # fmt: skip
    summary = done.stdout[-3000:]
    print(summary)
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "No issues found" in done.stdout or "passed" in done.stdout, summary
