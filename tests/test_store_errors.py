"""The error boundary: store and broker failures are one line naming what and where, exit 2.

Every CLI command that touches the store is run against a PostgreSQL that is
not there, a SQLite file in a missing directory, a corrupt SQLite file and a
store without the schema. The matrix runs `geoscrape.cli.main` in-process
(the console entry point itself, not a test double); one case also runs as a
real `geoscrape` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geoscrape.cli import main
from regions.bus import check_broker
from regions.errors import BrokerLoginRefused, BrokerUnreachable, BrokerVhostMissing
from storage.db import absolute_sqlite

GEOSCRAPE = str(Path(sys.executable).with_name("geoscrape"))

STORE_COMMANDS = [
    ["runs"],
    ["runs", "show", "abc"],
    ["fetches", "abc"],
    ["items", "shop"],
    ["compare", "shop"],
    ["access", "shop"],
    ["history", "shop", "K"],
    ["changes", "shop"],
    ["export", "shop", "-o", "{tmp}/out.csv"],
    ["status"],
    ["dead"],
    ["dead", "requeue", "abc"],
    ["cancel", "abc"],
    ["db", "upgrade"],
]


def _stores(tmp: Path) -> dict[str, tuple[str, str]]:
    corrupt = tmp / "corrupt.db"
    corrupt.write_bytes(b"this is not a SQLite database\n" * 200)
    empty = tmp / "empty.db"
    empty.write_bytes(b"")
    return {
        # name: (URL, text the one line must contain)
        "pg-down": ("postgresql://geo@127.0.0.1:1/nodb", "127.0.0.1:1/nodb"),
        "sqlite-missing-dir": (f"sqlite:///{tmp}/no/such/dir/g.db", f"{tmp}/no/such/dir"),
        "sqlite-corrupt": (f"sqlite:///{corrupt}", str(corrupt)),
        "sqlite-no-schema": (f"sqlite:///{empty}", "no geoscrape schema"),
    }


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["geoscrape", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), captured.err


@pytest.mark.parametrize(
    "store", ["pg-down", "sqlite-missing-dir", "sqlite-corrupt", "sqlite-no-schema"]
)
def test_every_store_command_prints_one_line_naming_the_store(
    store: str,
    tmp_path: Path,
    broker_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, names = _stores(tmp_path)[store]
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", url)
    monkeypatch.setenv("GEOSCRAPE_BROKER_URL", broker_url)  # reachable: the store is the problem
    config = tmp_path / "sites.yaml"
    config.write_text("regions: {eu: {}}\nsites: []\n")
    monkeypatch.setenv("GEOSCRAPE_CONFIG", str(config))
    for command in STORE_COMMANDS:
        if store == "sqlite-no-schema" and command == ["db", "upgrade"]:
            continue  # creating the schema is that command's job
        argv = [part.replace("{tmp}", str(tmp_path)) for part in command]
        code, err = _run_main(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (command, code, err)
        assert len(lines) == 1, (command, err)
        assert lines[0].startswith("error: store "), (command, err)
        assert names in lines[0], (command, err)
        assert "Traceback" not in err


def test_a_real_process_with_the_store_down(tmp_path: Path) -> None:
    env = dict(os.environ, GEOSCRAPE_DATABASE_URL="postgresql://geo:s3cret@127.0.0.1:1/x")
    done = subprocess.run(
        [GEOSCRAPE, "runs"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "store postgresql+psycopg://geo:***@127.0.0.1:1/x is unavailable" in done.stderr
    assert "s3cret" not in done.stderr


def test_reading_never_creates_an_empty_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOSCRAPE_HOME", str(tmp_path))
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", "sqlite:///geoscrape.db")
    code, err = _run_main(["runs"], capsys)
    assert code == 2
    assert f"store sqlite:///{tmp_path}/geoscrape.db does not exist yet" in err
    assert not (tmp_path / "geoscrape.db").exists()


def test_relative_sqlite_paths_resolve_against_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEOSCRAPE_HOME", raising=False)
    monkeypatch.setenv("GEOSCRAPE_CONFIG", str(tmp_path / "conf" / "sites.yaml"))
    assert absolute_sqlite("sqlite:///g.db") == f"sqlite:///{tmp_path}/conf/g.db"
    monkeypatch.setenv("GEOSCRAPE_HOME", str(tmp_path / "home"))
    assert absolute_sqlite("sqlite:///data/g.db") == f"sqlite:///{tmp_path}/home/data/g.db"
    assert absolute_sqlite("sqlite:////abs/g.db") == "sqlite:////abs/g.db"
    assert absolute_sqlite("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_sqlite("postgresql://h/db") == "postgresql://h/db"


def test_broker_failures_each_get_their_own_message(vhost_url: str) -> None:
    base, vhost = vhost_url.rsplit("/", 1)
    check_broker(vhost_url)  # the real one works
    with pytest.raises(BrokerLoginRefused, match=r"refused the login.*check the user and password"):
        check_broker(vhost_url.replace("guest:guest@", "guest:wrong@"))
    with pytest.raises(BrokerVhostMissing, match=r"vhost not usable.*add_vhost"):
        check_broker(f"{base}/{vhost}-missing")
    with pytest.raises(BrokerUnreachable, match=r"cannot reach RabbitMQ.*rabbitmq-server"):
        check_broker("amqp://guest:guest@127.0.0.1:1//")


def test_the_cli_says_which_broker_problem_it_is(
    vhost_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = tmp_path / "sites.yaml"
    config.write_text(
        "regions: {eu: {}}\nsites:\n  - name: shop\n    start_urls: ['http://127.0.0.1:1/']\n"
        "    regions: [eu]\n    allow_hosts: ['127.0.0.1:1']\n"
        "    extract: {fields: {title: {css: 'h1::text'}}}\n"
    )
    monkeypatch.setenv("GEOSCRAPE_CONFIG", str(config))
    monkeypatch.setenv("GEOSCRAPE_BROKER_URL", vhost_url.replace("guest:guest@", "guest:wrong@"))
    code, err = _run_main(["crawl", "shop"], capsys)
    assert code == 2 and "refused the login" in err and "install" not in err, err
    monkeypatch.setenv("GEOSCRAPE_BROKER_URL", vhost_url + "-missing")
    code, err = _run_main(["crawl", "shop"], capsys)
    assert code == 2 and "vhost not usable" in err, err


def test_a_missing_database_is_not_a_missing_schema() -> None:
    from storage.boundary import SchemaMissing, StoreUnavailable, translate

    url = "postgresql://geo:pw@db/geo"
    missing_db = translate(url, RuntimeError('FATAL:  database "geo" does not exist'))
    assert isinstance(missing_db, StoreUnavailable)
    assert str(missing_db).startswith("store postgresql+psycopg://geo:***@db/geo is unavailable")
    no_table = translate(url, RuntimeError('relation "runs" does not exist'))
    assert isinstance(no_table, SchemaMissing)
    assert "run 'geoscrape db upgrade'" in str(no_table)
