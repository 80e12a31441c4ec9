"""Access verdicts: the pure classification, then the known store (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from storage.access import Outcome, access, classify, refusal
from storage.db import make_engine, session_factory
from tests.query_store import CAPTCHA, PAGE_B, PRICES, build_store, cli_json

OK = Outcome("https://s.example/a", 200)
OK_B = Outcome("https://s.example/b", 200)


def verdicts(outcomes: dict[str, list[Outcome]], **finished: bool) -> dict[str, str]:
    return {r: c.verdict for r, c in classify(outcomes, finished or None).items()}


def test_refusal_reasons() -> None:
    assert refusal(Outcome("https://s.example/a", 451)) == "HTTP 451"
    assert refusal(Outcome("https://s.example/a", 403)) == "HTTP 403"
    assert refusal(Outcome("https://s.example/a", 200, "https://s.example/captcha")) == (
        "captcha page"
    )
    assert refusal(Outcome("https://s.example/a", 200, "https://other.example/x")) == (
        "redirect off the site to other.example"
    )
    assert refusal(Outcome("https://s.example/a", 200, "https://s.example/b")) is None
    assert refusal(Outcome("https://s.example/a", 404)) is None
    assert refusal(Outcome("https://s.example/a", None, error="refused")) is None


def test_geo_blocked_when_another_region_got_the_urls() -> None:
    blocked = [Outcome(OK.url, 451), Outcome(OK_B.url, 200, "https://s.example/captcha")]
    cells = classify({"eu": [OK, OK_B], "asia": blocked})
    assert (cells["asia"].verdict, cells["eu"].verdict) == ("geo-blocked", "ok")
    assert cells["asia"].reason == "HTTP 451, captcha page here; eu got the same URLs"
    assert cells["asia"].statuses == {"200": 1, "451": 1}
    assert [(e.url, e.why) for e in cells["asia"].evidence] == [
        (OK.url, "HTTP 451"),
        (OK_B.url, "captcha page"),
    ]


def test_blocked_everywhere_when_no_region_got_them() -> None:
    refused = [Outcome(OK.url, 403)]
    assert verdicts({"eu": refused, "us": [Outcome(OK.url, 451)]}) == {
        "eu": "blocked-everywhere",
        "us": "blocked-everywhere",
    }
    # another region getting *other* URLs does not make it a geo-block
    assert verdicts({"eu": refused, "us": [OK_B]}) == {"eu": "blocked-everywhere", "us": "ok"}


def test_unreachable_partial_ok_and_pending() -> None:
    down = [Outcome(OK.url, None, error="connection refused")]
    assert verdicts({"eu": down, "us": [OK]}) == {"eu": "unreachable", "us": "ok"}
    mixed = [OK, Outcome(OK_B.url, 451)]
    assert verdicts({"eu": mixed, "us": [OK, OK_B]}) == {"eu": "partial", "us": "ok"}
    flaky = [OK, Outcome(OK_B.url, None, error="timeout")]
    assert verdicts({"eu": flaky}) == {"eu": "partial"}
    # a 404 among good pages is a site problem, not an access one
    assert verdicts({"eu": [OK, Outcome(OK_B.url, 404)]}) == {"eu": "ok"}
    assert verdicts({"eu": []}, eu=False) == {"eu": "pending"}
    assert verdicts({"eu": []}, eu=True) == {"eu": "unreachable"}


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


def expected_round(tick: str, at: str) -> dict:
    ok = {"statuses": {"200": 2}, "evidence": [], "reason": "2 of 2 URL(s) ok", "verdict": "ok",
          "run_status": "succeeded", "signature": None, "label": "ok"}  # fmt: skip
    return {
        "round": tick,
        "at": at,
        "identical": None,  # the store's fetches carry no digests
        "cells": [
            {
                "region": "asia",
                "verdict": "geo-blocked",
                "signature": None,
                "label": "geo-blocked",
                "reason": "HTTP 451, captcha page here; eu, us got the same URLs",
                "run_id": f"{tick}-asia",
                "run_status": "succeeded",
                "statuses": {"200": 1, "451": 1},
                "evidence": [
                    {
                        "url": PRICES,
                        "status": 451,
                        "final_url": None,
                        "error": None,
                        "why": "HTTP 451",
                    },
                    {
                        "url": PAGE_B,
                        "status": 200,
                        "final_url": CAPTCHA,
                        "error": None,
                        "why": "captcha page",
                    },
                ],
            },
            {"region": "eu", "run_id": f"{tick}-eu", **ok},
            {"region": "us", "run_id": f"{tick}-us", **ok},
        ],
    }


EXPECTED = {
    "site": "shop",
    "regions": ["asia", "eu", "us"],
    "rounds": [
        expected_round("t2", "2024-05-02T12:00:00Z"),
        expected_round("t1", "2024-05-01T12:00:00Z"),
    ],
    # The store's runs carry no egress attestation: unverified (issue 9).
    "verified_only": False,
    "unverified": ["asia", "eu", "us"],
}


def test_access_matrix_of_the_store(session: Session) -> None:
    assert access(session, "shop").model_dump(mode="json") == EXPECTED
    one = access(session, "shop", rounds=1, region="us").model_dump(mode="json")
    assert one == {
        "site": "shop",
        "regions": ["us"],
        "rounds": [{**EXPECTED["rounds"][0], "cells": [EXPECTED["rounds"][0]["cells"][2]]}],
        "verified_only": False,
        "unverified": ["us"],
    }


def test_cli_access_json(store: str) -> None:
    assert cli_json(store, "access", "shop") == EXPECTED
