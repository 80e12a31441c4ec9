"""History and changes on the known store, content-hash dedup, and the 0004 backfill."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from storage.content import canonical_json, content_hash
from storage.db import make_engine, session_factory
from storage.errors import NotFoundError
from storage.history import changes, history
from storage.migrate import upgrade
from storage.models import contents, observations
from tests.query_store import build_store, cli, cli_json, data

DAY0_RUN = "2024-05-01T12:02:00Z"
DAY1_RUN = "2024-05-02T12:02:00Z"
DAY1_END = "2024-05-02T12:03:00Z"


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


def entry(region: str, values: Any, first: str, last: str, runs: list[str]) -> dict[str, Any]:
    return {
        "region": region,
        "seen": values is not None,
        "values": values,
        "first_at": first,
        "last_at": last,
        "first_run_id": runs[0],
        "last_run_id": runs[-1],
        "runs": len(runs),
    }


HISTORY_B_PRICE = {
    "site": "shop",
    "key": "B",
    "fields": ["price"],
    "entries": [
        entry("eu", {"price": 20.0}, DAY0_RUN, DAY1_RUN, ["t1-eu", "t2-eu"]),
        entry("us", {"price": 20.0}, DAY0_RUN, DAY0_RUN, ["t1-us"]),
        entry("us", {"price": 25.0}, DAY1_RUN, DAY1_RUN, ["t2-us"]),
    ],
}
HISTORY_C = {
    "site": "shop",
    "key": "C",
    "fields": None,
    "entries": [
        entry("eu", data("C", 30.0), DAY0_RUN, DAY1_RUN, ["t1-eu", "t2-eu"]),
        entry("us", data("C", 30.0), DAY0_RUN, DAY0_RUN, ["t1-us"]),
        entry("us", None, DAY1_END, DAY1_END, ["t2-us"]),  # vanished
    ],
}


def change(region: str, key: str, kind: str, run: str, at: str, before: Any, after: Any,
           fields: list[str]) -> dict[str, Any]:  # fmt: skip
    return {"region": region, "key": key, "change": kind, "at": at, "run_id": run,
            "before": before, "after": after, "fields": fields}  # fmt: skip


CHANGES_DAY1 = {
    "site": "shop",
    "since": "2024-05-01T18:00:00Z",
    "regions": ["asia", "eu", "us"],
    "total": 2,
    "offset": 0,
    "changes": [
        change("us", "B", "changed", "t2-us", DAY1_END, data("B", 20.0), data("B", 25.0),
               ["price"]),
        change("us", "C", "vanished", "t2-us", DAY1_END, data("C", 30.0), None,
               ["sku", "name", "price"]),
    ],
}  # fmt: skip


def test_history_of_a_price_per_region(session: Session) -> None:
    result = history(session, "shop", "B", fields=["price"])
    assert result.model_dump(mode="json") == HISTORY_B_PRICE


def test_history_shows_a_vanished_item(session: Session) -> None:
    assert history(session, "shop", "C").model_dump(mode="json") == HISTORY_C
    us = history(session, "shop", "C", region="us").model_dump(mode="json")
    assert us["entries"] == HISTORY_C["entries"][1:]


def test_history_of_an_unknown_key(session: Session) -> None:
    with pytest.raises(NotFoundError, match="site 'shop' has no item 'Z'"):
        history(session, "shop", "Z")


def test_changes_since_day_one(session: Session) -> None:
    since = datetime(2024, 5, 1, 18, tzinfo=UTC)
    assert changes(session, "shop", since).model_dump(mode="json") == CHANGES_DAY1


def test_changes_since_the_start_include_appearances(session: Session) -> None:
    result = changes(session, "shop", datetime(2024, 4, 1, tzinfo=UTC))
    assert [(c.region, c.key, c.change, c.run_id) for c in result.changes] == [
        ("eu", "A", "appeared", "t1-eu"),
        ("eu", "B", "appeared", "t1-eu"),
        ("eu", "C", "appeared", "t1-eu"),
        ("us", "A", "appeared", "t1-us"),
        ("us", "B", "appeared", "t1-us"),
        ("us", "C", "appeared", "t1-us"),
        ("us", "B", "changed", "t2-us"),
        ("us", "C", "vanished", "t2-us"),
    ]
    page = changes(session, "shop", datetime(2024, 4, 1, tzinfo=UTC), limit=2, offset=6)
    assert (page.total, [(c.key, c.change) for c in page.changes]) == (
        8,
        [("B", "changed"), ("C", "vanished")],
    )
    assert changes(session, "shop", datetime(2024, 6, 1, tzinfo=UTC)).changes == []


def test_unchanged_observations_share_one_copy_of_their_data(session: Session) -> None:
    # 11 observations (3 + 3 + 3 + 2; asia saw nothing), 4 distinct values: A, B=20, C, B=25.
    assert session.scalar(select(func.count()).select_from(observations)) == 11
    stored = dict(session.execute(select(contents.c.hash, contents.c.data)).all())
    assert stored == {
        content_hash(d): d
        for d in (data("A", 10.0), data("B", 20.0), data("C", 30.0), data("B", 25.0))
    }


def test_content_hashes_stay_what_stored_observations_hold() -> None:
    # A change of serialisation would make every unchanged item look changed and
    # store its data again: the canonical text is json.dumps' with sorted keys.
    value = {"price": 9.99, "name": "Th\u00e9 \u2028", "tags": ["a", None, True], "n": 10**20}
    assert content_hash(value | {"big": 1e16}) == "173ef83295f6e273b84ad96700f66e19"
    assert canonical_json(value) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def test_cli_history_and_changes_json(store: str) -> None:
    assert cli_json(store, "history", "shop", "B", "--field", "price") == HISTORY_B_PRICE
    assert cli_json(store, "changes", "shop", "--since", "2024-05-01T18:00:00") == CHANGES_DAY1
    bad = cli(store, "changes", "shop", "--since", "yesterday")
    assert (bad.returncode, bad.stderr.strip()) == (
        2,
        # The same text as the API's for the same bad filter (issue 16).
        "error: since: 'yesterday' is neither a duration (30m, 12h, 1d, 2w) nor an ISO date/time",
    )


def test_migration_0004_moves_existing_data_to_contents(db_url: str) -> None:
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    rows = [("r1", "a", {"p": 1}), ("r1", "b", {"p": 2}), ("r2", "a", {"p": 1})]
    try:
        with engine.begin() as conn:
            for run in ("r1", "r2"):
                conn.execute(
                    text(
                        "INSERT INTO runs (id, site, region, trigger, status, stats, attempts)"
                        " VALUES (:id, 's', 'eu', 'manual', 'succeeded', '{}', 0)"
                    ),
                    {"id": run},
                )
            for run, key, value in rows:
                conn.execute(
                    text(
                        "INSERT INTO observations (run_id, site, region, key, url, data, "
                        "observed_at) VALUES (:r, 's', 'eu', :k, 'u', :d, :t)"
                    ),
                    {"r": run, "k": key, "d": __import__("json").dumps(value),
                     "t": datetime(2024, 5, 1, tzinfo=UTC)},
                )  # fmt: skip
        upgrade(db_url, "head")
        with session_factory(engine)() as s:
            joined = s.execute(
                select(observations.c.run_id, observations.c.key, contents.c.data)
                .join(contents, contents.c.hash == observations.c.content_hash)
                .order_by(observations.c.run_id, observations.c.key)
            ).all()
            assert [tuple(r) for r in joined] == rows
            assert s.scalar(select(func.count()).select_from(contents)) == 2
    finally:
        engine.dispose()
