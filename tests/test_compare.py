"""Cross-region compare on the known store (tests/query_store.py), SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from storage.compare import Comparison, compare
from storage.db import make_engine, session_factory
from storage.errors import NotFoundError, QueryError
from tests.query_store import build_store, cli, cli_json

REGIONS = ["asia", "eu", "us"]


def row(key: str, name: dict[str, Any], price: dict[str, Any], differs: list[str],
        missing: list[str], spread: tuple[float, float, float]) -> dict[str, Any]:  # fmt: skip
    low, high, ratio = spread
    return {
        "key": key,
        "values": {"name": name, "price": price},
        "differs": differs,
        "missing": missing,
        "spread": {"price": {"min": low, "max": high, "ratio": ratio, "currency": None}},
        "spread_by_currency": {},
        # One sample per region: a field differs or not; no field is noisy.
        "verdicts": {
            f: "differs" if f in differs else "missing" if missing else "same"
            for f in ("name", "price")
        },
        "noisy": [],
        "samples": {},
    }


def by_region(asia: Any, eu: Any, us: Any) -> dict[str, Any]:
    return {"asia": asia, "eu": eu, "us": us}


def runs(tick: str) -> list[dict[str, Any]]:
    day = "02" if tick == "t2" else "01"
    return [
        {"region": r, "run_id": f"{tick}-{r}", "status": "succeeded", "tick": tick,
         "finished_at": f"2024-05-{day}T12:03:00Z", "verified": False, "egress": None}
        for r in REGIONS
    ]  # fmt: skip


def summary(differing: int, us_missing: int) -> list[dict[str, Any]]:
    missing = {"asia": 3, "eu": 0, "us": us_missing}

    # asia misses every key, so every key that does not differ is "missing"
    def counts(differs: int) -> dict[str, int]:
        return {"same": 0, "differs": differs, "noisy": 0, "missing": 3 - differs}

    return [
        {"field": "name", "type": "str", "numeric": False, "differing": 0, "missing": missing,
         "counts": counts(0)},
        {"field": "price", "type": "price", "numeric": True, "differing": differing,
         "missing": missing, "counts": counts(differing)},
    ]  # fmt: skip


ROW_A = row("A", by_region(None, "Alpha", "Alpha"), by_region(None, 10.0, 10.0), [], ["asia"],
            (10.0, 10.0, 1.0))  # fmt: skip
ROW_B = row("B", by_region(None, "Beta", "Beta"), by_region(None, 20.0, 25.0), ["price"], ["asia"],
            (20.0, 25.0, 1.25))  # fmt: skip
ROW_C = row("C", by_region(None, "Gamma", None), by_region(None, 30.0, None), [], ["asia", "us"],
            (30.0, 30.0, 1.0))  # fmt: skip

LATEST = {
    "site": "shop",
    "mode": "latest",
    "tick": None,
    "regions": REGIONS,
    "fields": ["name", "price"],
    "runs": runs("t2"),
    "summary": summary(differing=1, us_missing=1),
    "total": 3,
    "offset": 0,
    "rows": [ROW_A, ROW_B, ROW_C],
    # The store's runs carry no egress attestation: unverified (issue 9).
    "verified_only": False,
    "unverified": REGIONS,
    "identical": None,  # the store's fetches carry no digests
}


@pytest.fixture
def store(db_url: str) -> str:
    build_store(db_url)
    return db_url


@pytest.fixture
def session(store: str) -> Iterator[Session]:
    engine = make_engine(store)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


def test_compare_latest_is_exactly_the_expected_rows(session: Session) -> None:
    assert compare(session, "shop").model_dump(mode="json") == LATEST


def test_compare_of_a_tick(session: Session) -> None:
    result = compare(session, "shop", tick="t1").model_dump(mode="json")
    same = [
        row(k, by_region(None, NAMES, NAMES), by_region(None, p, p), [], ["asia"], (p, p, 1.0))
        for k, NAMES, p in (("A", "Alpha", 10.0), ("B", "Beta", 20.0), ("C", "Gamma", 30.0))
    ]
    assert result == {
        **LATEST,
        "mode": "tick",
        "tick": "t1",
        "runs": runs("t1"),
        "summary": summary(differing=0, us_missing=0),
        "rows": same,
    }


def test_only_diff_field_and_paging(session: Session) -> None:
    only = compare(session, "shop", fields=["price"], only_diff=True)
    assert [(r.key, r.differs, r.missing) for r in only.rows] == [
        ("A", [], ["asia"]),
        ("B", ["price"], ["asia"]),
        ("C", [], ["asia", "us"]),
    ]
    assert only.fields == ["price"]
    page = compare(session, "shop", limit=1, offset=1)
    assert (page.total, page.offset, [r.key for r in page.rows]) == (3, 1, ["B"])
    assert page.summary == compare(session, "shop").summary  # summary covers every row


def test_only_diff_drops_rows_equal_everywhere(session: Session) -> None:
    cmp = Comparison(session, "shop", only_diff=True, regions=["eu", "us"])
    assert [(r.key, r.differs, r.missing) for r in cmp.rows()] == [
        ("B", ["price"], []),
        ("C", [], ["us"]),
    ]
    assert [(s.field, s.differing, s.missing) for s in cmp.summary()] == [
        ("name", 0, {"eu": 0, "us": 1}),
        ("price", 1, {"eu": 0, "us": 1}),
    ]


def test_unknown_site_tick_or_region_is_a_clear_error(session: Session) -> None:
    with pytest.raises(NotFoundError, match="unknown site 'nope'"):
        compare(session, "nope")
    with pytest.raises(NotFoundError, match="no runs in tick 't9'"):
        compare(session, "shop", tick="t9")
    with pytest.raises(QueryError, match="region\\(s\\) mars"):
        Comparison(session, "shop", regions=["mars"])


def test_cli_compare_json_is_the_same_result(store: str) -> None:
    assert cli_json(store, "compare", "shop") == LATEST
    assert cli_json(store, "compare", "shop", "--latest", "--only-diff") == LATEST
    table = cli(store, "compare", "shop")
    assert table.returncode == 0, table.stderr
    assert "price@us" in table.stdout and "1.250" in table.stdout
    assert "3 keys" in table.stdout
    done = cli(store, "compare", "nope")
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "error: unknown site 'nope': no runs of it in the store",
    )
    both = cli(store, "compare", "shop", "--latest", "--run-tick", "t1")
    assert both.returncode == 2 and "either --run-tick or --latest" in both.stderr
