"""The `egress` and `geoip` config contract, and the pure parts of verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.config import Egress, GeoIP, redact_proxy
from scheduler.loader import ConfigError, parse_config
from scraper.egress import ChildEgress, Exit, Exits, NoExitLeft
from scraper.verify import EgressError, RegionEgress, Verifier, echo_address
from tests.proxies import write_geoip

SITES = """\
sites:
  - name: shop
    start_urls: ["https://shop.example/"]
    regions: [eu]
    extract: {fields: {t: {css: "title::text"}}}
"""


@pytest.fixture
def geoip(tmp_path: Path) -> Path:
    path = tmp_path / "Country.mmdb"
    write_geoip(path, {"203.0.113.0/24": "DE", "198.51.100.0/24": "US"})
    return path


def config(geoip: Path, egress: str) -> str:
    return f'geoip:\n  databases: ["{geoip}"]\nregions:\n  eu:\n    egress:\n{egress}\n' + SITES


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "sites.yaml", env or {})
    return [str(p) for p in info.value.problems]


def test_a_full_egress_config_loads_with_the_secret_substituted(geoip: Path) -> None:
    text = config(
        geoip,
        '      proxies:\n        - "http://user:${EU_PROXY_PASS}@proxy-eu-1.example:3128"\n'
        '        - "socks5://proxy-eu-2.example:1080"\n'
        "      rotate: per-request\n"
        '      verify: {echo_url: "https://ip-echo.example/", country: de,\n'
        '               networks: ["203.0.113.0/24"], every: 10m}',
    )
    loaded = parse_config(text, "sites.yaml", {"EU_PROXY_PASS": "hunter2"})
    egress = loaded.egress("eu")
    assert egress is not None and egress.verify is not None
    assert egress.proxies[0] == "http://user:hunter2@proxy-eu-1.example:3128"
    assert (egress.rotate, egress.verify.country, egress.verify.every) == ("per-request", "DE", 600)
    assert redact_proxy(egress.proxies[0]) == "http://user:***@proxy-eu-1.example:3128"
    # A job never carries the egress: it is not part of a site's resolved config.
    assert "hunter2" not in loaded.resolved_site("shop").model_dump_json()


def test_bad_egress_values_are_file_line_errors(geoip: Path, tmp_path: Path) -> None:
    text = config(
        geoip,
        '      proxies: ["ftp://user:hunter2@p.example:21", "http://no-port.example"]\n'
        "      rotate: sometimes\n"
        '      verify: {echo_url: "https://e.example/", country: XX}',
    ).replace(str(geoip), str(tmp_path / "missing.mmdb"))
    found = problems(text)
    assert any(
        p.startswith("sites.yaml:2: geoip.databases[0]: cannot read geoip database") for p in found
    ), found
    assert any(
        p.startswith("sites.yaml:6: regions.eu.egress.proxies[0]: proxy scheme ftp:") for p in found
    ), found
    assert any(
        "proxies[1]: proxy 'http://no-port.example' needs a host and a port" in p for p in found
    ), found
    assert any(p.startswith("sites.yaml:7: regions.eu.egress.rotate:") for p in found), found
    assert any("'XX' is not an ISO 3166 alpha-2 country code" in p for p in found), found
    assert not any("hunter2" in p for p in found), found  # redacted in errors too
    assert len(found) == 5, found


def test_unknown_egress_key_and_unset_secret(geoip: Path) -> None:
    found = problems(
        config(geoip, '      proxies: ["http://u:${NOPE}@p.example:3128"]\n      rotation: per-run')
    )
    assert any("environment variable 'NOPE' is not set" in p for p in found), found
    assert any("rotation: unknown key (did you mean 'rotate'?)" in p for p in found), found


def test_verify_needs_a_geoip_database() -> None:
    text = 'regions:\n  eu:\n    egress: {verify: {echo_url: "http://e.example/", country: DE}}\n'
    found = problems(text + SITES)
    assert any("egress.verify needs 'geoip.databases'" in p for p in found), found


def test_echo_answers() -> None:
    assert echo_address(b"203.0.113.7\n") == "203.0.113.7"
    assert echo_address(b'{"ip": "2001:db8::1"}') == "2001:db8::1"
    with pytest.raises(EgressError, match="not an IP address"):
        echo_address(b"<html>")
    with pytest.raises(EgressError, match="without an 'ip'"):
        echo_address(b'{"origin": "203.0.113.7"}')


def test_every_database_must_agree_and_know_the_address(geoip: Path, tmp_path: Path) -> None:
    other = tmp_path / "Other.mmdb"
    write_geoip(other, {"203.0.113.0/25": "DE", "203.0.113.128/25": "FR"})
    egress = Egress.model_validate(
        {"verify": {"echo_url": "http://e.example/", "country": "DE",
                    "networks": ["203.0.113.0/24"]}}
    )  # fmt: skip
    verifier = Verifier(egress, GeoIP(databases=[str(geoip), str(other)]))
    assert verifier.problem("203.0.113.7", verifier.countries("203.0.113.7")) is None
    assert verifier.problem("203.0.113.200", verifier.countries("203.0.113.200")) == (
        "address 203.0.113.200 is in FR per Other.mmdb, not DE"
    )
    assert verifier.problem("198.51.100.1", verifier.countries("198.51.100.1")) == (
        "address 198.51.100.1 is outside the allowed networks (203.0.113.0/24)"
    )
    unknown = Verifier(Egress.model_validate({"verify": {"echo_url": "http://e.example/",
                                                         "country": "DE"}}),
                       GeoIP(databases=[str(other)]))  # fmt: skip
    assert unknown.problem("192.0.2.1", unknown.countries("192.0.2.1")) == (
        "address 192.0.2.1 is unknown to geoip database Other.mmdb"
    )
    blind = Verifier(Egress(verify=unknown.verify), None)
    assert blind.problem("203.0.113.7", blind.countries("203.0.113.7")) == (
        "no geoip database to check the country against"
    )


def test_a_verified_region_with_no_verified_exit_offers_no_job() -> None:
    region = RegionEgress(
        Egress.model_validate(
            {"proxies": ["http://127.0.0.1:9"],
             "verify": {"echo_url": "http://127.0.0.1:9/", "country": "DE"}}
        ),
        None,
    )  # fmt: skip
    assert region.for_job() is None and not region.open()
    reports = region.reports()
    assert reports is not None and reports[0].reason == "not verified yet"
    direct = RegionEgress(None, None)
    plan = direct.for_job()
    assert plan is not None and plan[1].verified is False and direct.reports() is None


def test_exits_fail_closed() -> None:
    a, b = Exit(proxy="http://u:pw@10.0.0.1:1", address="a"), Exit(proxy="http://10.0.0.2:1")
    rotating = Exits(ChildEgress(rotate="per-request", exits=[a, b]))
    assert [rotating.pick(), rotating.pick(), rotating.pick()] == [a, b, a]
    assert rotating.failed(a, "Connection refused") is True
    assert rotating.pick() == b
    assert rotating.failed(b, "Connection refused") is False
    assert rotating.failure == "egress proxy http://10.0.0.2:1 failed: Connection refused"
    with pytest.raises(NoExitLeft):
        rotating.pick()
    assert "pw" not in repr(a) and "pw" not in str(a)  # a log line of an exit shows no password
    sticky = Exits(ChildEgress(rotate="per-run", exits=[a, b]))
    assert sticky.pick() == a and sticky.pick() == a
    assert sticky.failed(a, "Proxy error") is False
    assert sticky.failure == "egress proxy http://u:***@10.0.0.1:1 failed: Proxy error"
    with pytest.raises(NoExitLeft):
        sticky.pick()
    assert Exits(ChildEgress()).pick() is None  # no egress: the direct network, as before


def test_scrapy_egress_middleware_fails_over_and_fails_closed() -> None:
    from scrapy.http import Request
    from twisted.internet.error import ConnectionRefusedError

    from scraper.scrapy_engine import EXIT_META, EgressMiddleware, EgressRefused

    a = Exit(proxy="http://u:pw@10.0.0.1:3128", address="203.0.113.1")
    b = Exit(proxy="http://10.0.0.2:3128", address="203.0.113.2")
    rotating = EgressMiddleware(Exits(ChildEgress(rotate="per-request", exits=[a, b])))
    request = Request("http://shop.example/p/1", meta={"proxy": "http://spider-own:1"})
    rotating.process_request(request)
    assert (request.meta["proxy"], request.meta[EXIT_META]) == (a.proxy, a)  # spider's replaced
    retry = rotating.process_exception(request, ConnectionRefusedError())
    assert retry is not None and "proxy" not in retry.meta and retry.dont_filter
    rotating.process_request(retry)
    assert retry.meta["proxy"] == b.proxy  # the other exit, never the direct network

    sticky = EgressMiddleware(Exits(ChildEgress(rotate="per-run", exits=[a, b])))
    first = Request("http://shop.example/p/1")
    sticky.process_request(first)
    assert sticky.process_exception(first, ConnectionRefusedError()) is None
    with pytest.raises(EgressRefused, match="no egress exit left"):
        sticky.process_request(Request("http://shop.example/p/2"))
