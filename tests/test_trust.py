"""Issue 14 end to end: real workers (one per region, each behind its own view
of the site), real ingest, the CLI. Noise-controlled compare, block pages,
monitors and alerts, WARC evidence."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from warcio.archiveiterator import ArchiveIterator

from storage.models import fetches, items, runs
from tests.harness import stack
from tests.query_store import cli_json, free_port
from tests.trustsite import Answer, card, html, region_views, regional_worker

pytestmark = pytest.mark.slow

SKUS = ["P1", "P2", "P3", "P4"]
EXTRACT = """\
    extract:
      items: "div.product"
      key: sku
      fields:
        sku: {css: "::attr(data-sku)"}
        name: {css: ".name::text"}
        price: {css: ".price::text", type: price}
        shipping: {css: ".shipping::text", type: price}
"""


# --- samples: an A/B test inside a region is noise, not a regional difference --------


def ab_shop(region: str, host: str, path: str, hit: int) -> Answer:
    """Every page A/B tests its prices: visitors are bucketed round robin, and the
    regions' buckets start out of phase, so one fetch per region always
    disagrees. Shipping really differs by region; names never do."""
    variant = (hit + (region == "us")) % 2
    shipping = {"eu": 4.0, "us": 9.0}[region]
    cards = "".join(
        card(sku, f"Item {sku}", 10.0 + i + 2.0 * variant, shipping) for i, sku in enumerate(SKUS)
    )
    return 200, [], html(f"<h1>Shop</h1>{cards}")


AB_CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
defaults:
  politeness: {{delay: 0, robots: ignore}}
  limits: {{timeout: 5s}}
sites:
  - name: one
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/one/prices.html"]
    regions: [eu, us]
    allow_hosts: ["127.0.0.1"]
{extract}
  - name: two
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/two/prices.html"]
    regions: [eu, us]
    allow_hosts: ["127.0.0.1"]
    compare: {{samples: 2, window: 5s, tolerance: 1%}}
    keep_bodies: true
{extract}
"""


def verdicts(result: dict[str, Any], field: str) -> set[str]:
    return {row["verdicts"][field] for row in result["rows"]}


def test_samples_tell_an_ab_test_from_a_regional_difference_and_warc_keeps_the_evidence(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    config = AB_CONFIG.format(port=free_port(), extract=EXTRACT)
    with (
        region_views(["eu", "us"], ab_shop) as ports,
        stack(tmp_path, vhost_url, sqlite_url, config) as s,
    ):
        s.ingest()
        for region, port in ports.items():
            regional_worker(s, region, port)
        for site in ("one", "two"):
            done = s.cli("crawl", site, "--wait", "--timeout", "120", timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr

        # One sample per region: the A/B test reads as a regional price difference.
        one = cli_json(sqlite_url, "compare", "one")
        assert len(one["rows"]) == len(SKUS)
        assert verdicts(one, "price") == {"differs"}  # spurious
        assert verdicts(one, "shipping") == {"differs"}
        assert verdicts(one, "name") == {"same"}

        # Two samples per region: the price varies inside each region (noisy), shipping
        # differs beyond that spread, names are the same; the summary counts each.
        two = cli_json(sqlite_url, "compare", "two")
        assert verdicts(two, "price") == {"noisy"}
        assert verdicts(two, "shipping") == {"differs"}
        assert verdicts(two, "name") == {"same"}
        counts = {f["field"]: f["counts"] for f in two["summary"]}
        n = len(SKUS)
        assert counts["price"] == {"same": 0, "differs": 0, "noisy": n, "missing": 0}
        assert counts["shipping"] == {"same": 0, "differs": n, "noisy": 0, "missing": 0}
        assert counts["name"] == {"same": n, "differs": 0, "noisy": 0, "missing": 0}
        p1 = next(r for r in two["rows"] if r["key"] == "P1")
        assert {r: sorted(v) for r, v in p1["samples"]["price"].items()} == {
            "eu": [10.0, 12.0],
            "us": [10.0, 12.0],
        }
        csv_out = s.cli("compare", "two", "--format", "csv")
        assert csv_out.returncode == 0, csv_out.stderr
        header = csv_out.stdout.splitlines()[0].split(",")
        assert {"price.verdict", "shipping.verdict", "name.verdict", "noisy"} <= set(header)

        # Evidence: every fetch has its digest; the run's bodies read back from WARC.
        eu_run = next(r for r in two["runs"] if r["region"] == "eu")["run_id"]
        fetched = json.loads(s.cli("fetches", eu_run, "--format", "json").stdout)
        assert [(f["sample"], f["status"], f["block"]) for f in fetched] == [
            (0, 200, None),
            (1, 200, None),
        ]
        assert fetched[0]["sha256"] != fetched[1]["sha256"]  # the two A/B variants
        warc = tmp_path / "two.warc.gz"
        done = s.cli("export", "two", "--kind", "warc", "--run", eu_run, "-o", str(warc))
        assert done.returncode == 0, done.stderr
        with gzip.open(warc, "rb") as raw, warc.open("rb") as fh:
            assert raw.read(4) == b"WARC"
            records = [
                (
                    rec.rec_headers.get_header("WARC-Target-URI"),
                    rec.http_headers.get_statuscode(),
                    hashlib.sha256(rec.content_stream().read()).hexdigest(),
                )
                for rec in ArchiveIterator(fh)
                if rec.rec_type == "response"
            ]
        assert records == [(f["url"], str(f["status"]), f["sha256"]) for f in fetched]

        bad = s.cli("export", "one", "--kind", "warc", "--run", "nope", "-o", str(warc))
        assert (bad.returncode, bad.stderr.strip()) == (2, "error: no run 'nope' in the store")


# --- block pages: named by their signature, and never stored as data ---------------

CLOUDFLARE_BAN = html(
    "<title>Access denied | shop used Cloudflare to restrict access</title>"
    "<h1>Error 1009</h1><p>Access denied</p><p>The owner of this website has banned the "
    "country or region your IP address is in from accessing this website.</p>"
    + card("P1", "Item P1", 10.0)  # a block page that looks like data must not become data
)
CAPTCHA_WALL = html(
    '<form><div class="g-recaptcha" data-sitekey="x"></div>'
    '<script src="https://www.google.com/recaptcha/api.js"></script></form>'
    + card("P1", "Item P1", 10.0)
)
DATADOME = html(
    "<script>var dd={'host':'geo.captcha-delivery.com'}</script>"
    '<script src="https://ct.captcha-delivery.com/c.js"></script>' + card("P1", "Item P1", 10.0)
)
COUNTRY = "127.0.0.2"  # the "country site" au is sent to (loopback, through au's proxy)


def blocking_shop(region: str, host: str, path: str, hit: int) -> Answer:
    real = html("".join(card(sku, f"Item {sku}", 10.0) for sku in SKUS))
    if path.startswith("/walled/"):  # bot protection for everyone
        return 403, [("Set-Cookie", "datadome=abc; Path=/")], DATADOME
    if region == "us":
        return 403, [("Server", "cloudflare"), ("CF-RAY", "8a1b2c3d4e5f-FRA")], CLOUDFLARE_BAN
    if region == "asia":
        return 200, [], CAPTCHA_WALL
    if region == "au" and host != COUNTRY:
        return 302, [("Location", f"http://{COUNTRY}/au/prices.html")], b""
    return 200, [], real


BLOCK_CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
  asia: {{}}
  au: {{}}
defaults:
  politeness: {{delay: 0, robots: ignore}}
  limits: {{timeout: 5s}}
sites:
  - name: shop
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/shop/prices.html"]
    regions: [eu, us, asia, au]
    allow_hosts: ["127.0.0.1", "{country}"]
{extract}
  - name: walled
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/walled/prices.html"]
    regions: [eu, us, asia, au]
    allow_hosts: ["127.0.0.1"]
{extract}
"""


def test_block_pages_are_named_by_signature_and_never_stored_as_items(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    regions = ["eu", "us", "asia", "au"]
    config = BLOCK_CONFIG.format(port=free_port(), country=COUNTRY, extract=EXTRACT)
    with (
        region_views(regions, blocking_shop) as ports,
        stack(tmp_path, vhost_url, sqlite_url, config) as s,
    ):
        s.ingest()
        for region, port in ports.items():
            regional_worker(s, region, port)
        for site in ("shop", "walled"):
            done = s.cli("crawl", site, "--wait", "--timeout", "120", timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr

        [shop] = cli_json(sqlite_url, "access", "shop")["rounds"]
        assert [(c["region"], c["label"]) for c in shop["cells"]] == [
            ("asia", "geo-blocked (recaptcha)"),  # a 200 captcha page is a block
            ("au", f"redirected (→ {COUNTRY})"),
            ("eu", "ok"),
            ("us", "geo-blocked (cloudflare-country-ban)"),  # other regions got the page
        ]
        assert shop["identical"] is False
        [walled] = cli_json(sqlite_url, "access", "walled")["rounds"]
        assert {c["label"] for c in walled["cells"]} == {"bot-blocked (datadome)"}
        table = s.cli("access", "shop")
        assert "geo-blocked (cloudflare-country-ban)" in table.stdout, table.stdout

        # Only eu's real page produced items: nothing from any block page or redirect.
        with s.sessions()() as session:
            stored = session.execute(select(items.c.site, items.c.region).distinct()).all()
            blocks = session.execute(
                select(runs.c.site, fetches.c.region, fetches.c.block).join(
                    runs, runs.c.id == fetches.c.run_id
                )
            ).all()
        assert stored == [("shop", "eu")]
        assert sorted(blocks) == sorted(
            [
                ("shop", "asia", "recaptcha"),
                ("shop", "au", "country-redirect"),
                ("shop", "eu", None),
                ("shop", "us", "cloudflare-country-ban"),
                *(("walled", region, "datadome") for region in regions),
            ]
        )
