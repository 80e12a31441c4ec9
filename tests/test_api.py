"""The HTTP API through a real `geoscrape api` (uvicorn) process, SQLite and PostgreSQL."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from tests.query_store import api_server, build_store, cli_json
from tests.test_access import EXPECTED as ACCESS
from tests.test_compare import LATEST
from tests.test_history import CHANGES_DAY1, HISTORY_B_PRICE, HISTORY_C

pytestmark = pytest.mark.slow


def get(base: str, path: str, token: str | None = None, **params: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(base + path, params=params, headers=headers, timeout=30)


def ok(base: str, path: str, **params: Any) -> Any:
    response = get(base, path, **params)
    assert response.status_code == 200, response.text
    return response.json()


def test_api_answers_like_the_cli(db_url: str) -> None:
    build_store(db_url)
    with api_server(db_url) as base:
        assert ok(base, "/sites/shop/compare") == LATEST
        assert ok(base, "/sites/shop/access") == ACCESS
        assert ok(base, "/sites/shop/history", key="B", field="price") == HISTORY_B_PRICE
        assert ok(base, "/sites/shop/history", key="C") == HISTORY_C
        assert ok(base, "/sites/shop/changes", since="2024-05-01T18:00:00") == CHANGES_DAY1
        assert ok(base, "/sites/shop/compare") == cli_json(db_url, "compare", "shop")

        sites = ok(base, "/sites")
        assert sites == {
            "data": [{"name": "shop", "regions": ["asia", "eu", "us"], "runs": 6,
                      "last_run_at": "2024-05-02T12:03:00Z"}],
            "limit": 100, "offset": 0, "next_offset": None,
        }  # fmt: skip

        # pagination: 6 runs, newest first, 4 per page
        first = ok(base, "/runs", site="shop", limit=4)
        assert (len(first["data"]), first["next_offset"]) == (4, 4)
        second = ok(base, "/runs", site="shop", limit=4, offset=4)
        assert (len(second["data"]), second["next_offset"]) == (2, None)
        ids = [r["id"] for r in first["data"] + second["data"]]
        assert ids == ["t2-us", "t2-eu", "t2-asia", "t1-us", "t1-eu", "t1-asia"]
        assert [r["id"] for r in ok(base, "/runs", region="eu")["data"]] == ["t2-eu", "t1-eu"]
        window = ok(base, "/runs", since="2024-05-02T00:00:00", status="succeeded")
        assert [r["id"] for r in window["data"]] == ["t2-us", "t2-eu", "t2-asia"]
        assert ok(base, "/runs", until="2024-05-02T00:00:00", region="us")["data"][0]["id"] == (
            "t1-us"
        )

        items = ok(base, "/sites/shop/items", limit=2, offset=1)
        assert [(i["region"], i["key"]) for i in items["data"]] == [("eu", "B"), ("eu", "C")]
        assert items["next_offset"] == 3
        page = ok(base, "/sites/shop/compare", limit=1, offset=2)
        assert (page["total"], [r["key"] for r in page["rows"]]) == (3, ["C"])
        assert page["summary"] == LATEST["summary"]

        schema = ok(base, "/openapi.json")
        assert {"/sites", "/runs", "/sites/{site}/compare", "/sites/{site}/history"} <= set(
            schema["paths"]
        )
        # The docs pages load their assets from the API itself: they work offline.
        for page, assets in (
            ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
            ("/redoc", ("redoc.standalone.js",)),
        ):
            html = get(base, page)
            assert html.status_code == 200, page
            sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
            assert sources and all(s.startswith("/") for s in sources), (page, sources)
            for asset in assets:
                path = next(s for s in sources if s.endswith(asset))
                served = get(base, path)
                assert served.status_code == 200 and len(served.content) > 10_000, path


def test_api_errors_are_json_with_a_message(sqlite_url: str) -> None:
    build_store(sqlite_url)
    with api_server(sqlite_url) as base:
        cases = [
            ("/runs", {"status": "sleeping"}, 400,
             "status: 'sleeping' is not a run status (one of: cancelled, dead, degraded, "
             "expired, failed, queued, running, skipped, succeeded)"),
            ("/runs", {"since": "last week"}, 400,
             "since: 'last week' is neither a duration (30m, 12h, 1d, 2w) nor an ISO date/time"),
            ("/runs", {"limit": "0"}, 400,
             "bad request: limit: Input should be greater than or equal to 1"),
            ("/runs", {"limit": "lots"}, 400,
             "bad request: limit: Input should be a valid integer, unable to parse string as an "
             "integer"),
            ("/sites/nope/compare", {}, 404, "unknown site 'nope': no runs of it in the store"),
            ("/sites/shop/history", {"key": "Z"}, 404, "site 'shop' has no item 'Z'"),
            ("/sites/shop/history", {}, 400, "bad request: key: Field required"),
            ("/sites/shop/compare", {"tick": "t9"}, 404, "site 'shop' has no runs in tick 't9'"),
            ("/nowhere", {}, 404, "Not Found"),
        ]  # fmt: skip
        for path, params, status, message in cases:
            response = get(base, path, **params)
            assert (response.status_code, response.json()) == (status, {"error": message}), path


def test_api_token_when_set(sqlite_url: str) -> None:
    build_store(sqlite_url)
    with api_server(sqlite_url, token="s3cret") as base:
        for token in (None, "wrong"):
            denied = get(base, "/sites", token=token)
            assert denied.status_code == 401
            assert denied.json() == {
                "error": "missing or wrong bearer token (set by GEOSCRAPE_API_TOKEN)"
            }
            assert denied.headers["WWW-Authenticate"] == "Bearer"
        allowed = get(base, "/sites/shop/compare", token="s3cret")
        assert (allowed.status_code, allowed.json()) == (200, LATEST)
        assert get(base, "/health").status_code == 200
