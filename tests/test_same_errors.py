"""Every front gives the same answer to the same bad name, URL, status or format.

Table-driven: each row is a CLI command and the API request that asks the
same thing of a known store (tests/query_store.py). The CLI must exit 2 with
`error: MESSAGE`; the API (a real `geoscrape api` process) must answer the
given 4xx with `{"error": MESSAGE}`, the same MESSAGE.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from geoscrape.cli import main
from tests.query_store import api_server, build_store

CASES = [
    # (CLI argv, API path and query, HTTP status)
    (["runs", "--site", "nosuch"], "/runs?site=nosuch", 404),
    (["runs", "--status", "bogus"], "/runs?status=bogus", 400),
    (["runs", "--region", "uk"], "/runs?region=uk", 404),
    (["runs", "--site", "shop", "--region", "uk"], "/runs?site=shop&region=uk", 404),
    (["items", "nosuch"], "/sites/nosuch/items", 404),
    (["items", "shop", "--region", "uk"], "/sites/shop/items?region=uk", 404),
    (["compare", "nosuch"], "/sites/nosuch/compare", 404),
    (["compare", "shop", "--field", "bogus"], "/sites/shop/compare?field=bogus", 400),
    (["access", "nosuch"], "/sites/nosuch/access", 404),
    (["access", "shop", "--region", "uk"], "/sites/shop/access?region=uk", 404),
    (["history", "nosuch", "A"], "/sites/nosuch/history?key=A", 404),
    (["history", "shop", "ZZZ"], "/sites/shop/history?key=ZZZ", 404),
    (["changes", "nosuch"], "/sites/nosuch/changes", 404),
    (["changes", "shop", "--since", "bogus"], "/sites/shop/changes?since=bogus", 400),
    (["runs", "show", "nosuch"], "/runs/nosuch", 404),
    (["fetches", "nosuch"], "/runs/nosuch/fetches", 404),
    (["fetches", "t1-asia", "--status", "4x4"], "/runs/t1-asia/fetches?status=4x4", 400),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('same-errors')}/g.db"
    build_store(url)
    with api_server(url) as base:
        yield url, base


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["geoscrape", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    return int(exit_info.value.code or 0), err.removeprefix("error: ")


@pytest.mark.parametrize(("argv", "path", "http"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli_and_api_give_the_same_error(
    argv: list[str],
    path: str,
    http: int,
    store: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, base = store
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", url)
    code, message = cli_error(argv, capsys)
    answer = requests.get(base + path, timeout=30)
    assert code == 2
    assert answer.status_code == http, answer.text
    assert answer.json() == {"error": message}


def test_check_reads_geoscrape_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "elsewhere.yaml"
    config.write_text(
        "regions: {eu: {}}\nsites:\n  - name: shop\n"
        "    start_urls: ['127.0.0.1:8811/prices.html']\n    regions: [eu]\n"
        "    extract: {fields: {t: {css: h1}}}\n"
    )
    monkeypatch.setenv("GEOSCRAPE_CONFIG", str(config))
    old = sys.argv
    sys.argv = ["geoscrape", "check"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"{config}:4: site 'shop': start_urls: start URL '127.0.0.1:8811/prices.html' "
        "has no scheme: write it as 'http://127.0.0.1:8811/prices.html' (or https://)"
    )


def test_crawl_outside_the_sites_regions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sites.yaml"
    config.write_text(
        "regions: {eu: {}, us: {}}\nsites:\n  - name: docs\n"
        "    start_urls: ['http://127.0.0.1:1/']\n    regions: [eu]\n"
        "    extract: {fields: {t: {css: h1}}}\n"
    )
    monkeypatch.setenv("GEOSCRAPE_CONFIG", str(config))
    monkeypatch.setenv("GEOSCRAPE_BROKER_URL", "amqp://guest:guest@127.0.0.1:1//")
    code, message = cli_error(["crawl", "docs", "--region", "us"], capsys)
    assert code == 2
    assert message == "site 'docs' does not run in region 'us' (its regions: eu)"


def test_a_spider_site_may_give_only_a_key() -> None:
    from scheduler.loader import parse_config

    config = parse_config(
        "regions: {eu: {}}\nsites:\n  - name: books\n    spider: 'pkg.mod:Books'\n"
        "    regions: [eu]\n    extract: {key: sku}\n"
    )
    site = config.site("books")
    assert site.extract is not None and site.extract.key == "sku"


def test_runs_show_and_fetches_tell_the_whole_story(
    store: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    url, base = store
    monkeypatch.setenv("GEOSCRAPE_DATABASE_URL", url)

    def cli_json(*argv: str) -> object:
        old = sys.argv
        sys.argv = ["geoscrape", *argv, "--format", "json"]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, capsys.readouterr().err
        finally:
            sys.argv = old
        return json.loads(capsys.readouterr().out)

    shown = cli_json("runs", "show", "t1-as")  # a unique prefix will do
    assert shown == requests.get(f"{base}/runs/t1-asia", timeout=30).json()
    assert shown["id"] == "t1-asia" and shown["config"]["name"] == "shop"
    assert shown["config"]["alerts"]["email"]["from"] == "gs@shop.example"  # as in sites.yaml
    failed = cli_json("fetches", "t1-asia", "--errors")
    assert failed == requests.get(f"{base}/runs/t1-asia/fetches?errors=true", timeout=30).json()
    assert failed["fetches"] and all(
        f["status"] is None or f["status"] >= 400 for f in failed["fetches"]
    )
    four = cli_json("fetches", "t1-asia", "--status", "4xx")
    assert {f["status"] for f in four["fetches"]} == {451}
