"""Pure units of `dev regions up` and compare: stable subnets, the worker URL,
spreads per currency. (The namespace tests themselves are tests/test_netns_regions.py.)"""

from __future__ import annotations

import pytest

from geoscrape.cli_regions import _worker_url
from geoscrape.netns import NetnsError, parse_subnet, pick_octets
from storage.compare import Spread, spreads_of


def test_subnets_are_stable_for_a_tag() -> None:
    first = pick_octets("dev", 3, used=set())
    assert first == pick_octets("dev", 3, used=set())  # a restart gets the same addresses
    assert len(set(first)) == 4 and all(1 <= o <= 254 for o in first)
    assert pick_octets("other", 3, used=set()) != first
    # A /24 in use elsewhere moves only what collides.
    moved = pick_octets("dev", 3, used={first[1]})
    assert moved[0] == first[0] and first[1] not in moved


def test_subnet_option() -> None:
    assert parse_subnet("10.77.40.0/24") == 40
    assert pick_octets("dev", 2, used=set(), service=40) == [40, 41, 42]
    assert pick_octets("dev", 2, used={41}, service=40) == [40, 42, 43]
    with pytest.raises(NetnsError, match=r"10\.77\.40\.0/24 is in use"):
        pick_octets("dev", 2, used={40}, service=40)
    with pytest.raises(NetnsError, match=r"give a /24 inside 10\.77\.0\.0/16"):
        parse_subnet("192.168.1.0/24")
    with pytest.raises(NetnsError, match="--subnet 'nope'"):
        parse_subnet("nope")


def test_worker_url_carries_the_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSCRAPE_BROKER_URL", "amqp://eu-user:s3cret@127.0.0.1:5672/geo")
    assert _worker_url("10.77.9.1") == "amqp://eu-user:s3cret@10.77.9.1:5672/geo"
    monkeypatch.delenv("GEOSCRAPE_BROKER_URL")
    assert _worker_url("10.77.9.1") == "amqp://guest:guest@10.77.9.1:5672//"


def test_spread_only_across_one_currency() -> None:
    one, several = spreads_of({"eu": 10.0, "us": 12.5}, {"eu": "EUR", "us": "EUR"})
    assert one == Spread(min=10.0, max=12.5, ratio=1.25, currency="EUR") and several == []
    one, several = spreads_of(
        {"eu": 10.0, "de": 11.0, "us": 12.5}, {"eu": "EUR", "de": "EUR", "us": "USD"}
    )
    assert one is None
    assert several == [
        Spread(min=10.0, max=11.0, ratio=1.1, currency="EUR"),
        Spread(min=12.5, max=12.5, ratio=1.0, currency="USD"),
    ]
    one, several = spreads_of({"eu": 2.0, "us": 4.0}, {})
    assert one == Spread(min=2.0, max=4.0, ratio=2.0) and several == []
