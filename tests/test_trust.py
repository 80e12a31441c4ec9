"""Issue 14 end to end: real workers (one per region, each behind its own view
of the site), real ingest, the CLI. Noise-controlled compare, block pages,
monitors and alerts, WARC evidence."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import threading
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from warcio.archiveiterator import ArchiveIterator

from storage.models import alerts, fetches, items, runs
from tests.harness import Stack, stack, wait_until
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


def crawl_all(s: Stack, sites: list[str], expected: int) -> None:
    """Dispatch a crawl of each site at once, then wait until every run succeeded."""
    for site in sites[:-1]:
        queued = s.cli("crawl", site)
        assert queued.returncode == 0, queued.stdout + queued.stderr
    done = s.cli("crawl", sites[-1], "--wait", "--timeout", "150", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr

    def statuses() -> list[str]:
        with s.sessions()() as session:
            return list(session.scalars(select(runs.c.status).where(runs.c.site.in_(sites))))

    wait_until(
        lambda: statuses() == ["succeeded"] * expected,
        timeout=60,
        what=f"the runs of {sites}",
    )


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
        crawl_all(s, ["one", "two"], expected=4)

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
        assert two["identical"] is False  # the cheap answer: the pages differ somewhere
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
        fetched = json.loads(s.cli("fetches", eu_run, "--format", "json").stdout)["fetches"]
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
    regions: [eu, us]
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
        crawl_all(s, ["shop", "walled"], expected=6)

        [shop] = cli_json(sqlite_url, "access", "shop")["rounds"]
        assert [(c["region"], c["label"]) for c in shop["cells"]] == [
            ("asia", "geo-blocked (recaptcha)"),  # a 200 captcha page is a block
            ("au", f"redirected (→ {COUNTRY})"),
            ("eu", "ok"),
            ("us", "geo-blocked (cloudflare-country-ban)"),  # other regions got the page
        ]
        assert shop["identical"] is False
        [walled] = cli_json(sqlite_url, "access", "walled")["rounds"]
        assert [(c["region"], c["label"]) for c in walled["cells"]] == [
            ("eu", "bot-blocked (datadome)"),  # no region got the page: bot protection
            ("us", "bot-blocked (datadome)"),
        ]
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
                ("walled", "eu", "datadome"),
                ("walled", "us", "datadome"),
            ]
        )


# --- monitors and alerts: a region whose items drop is degraded, and told once ------

MON_CONFIG = """\
regions:
  eu: {{}}
  us: {{}}
defaults:
  politeness: {{delay: 0, robots: ignore}}
  limits: {{timeout: 5s}}
sites:
  - name: mon
    engine: requests
    start_urls: ["http://127.0.0.1:{port}/mon/prices.html"]
    regions: [eu, us]
    allow_hosts: ["127.0.0.1"]
    expect: {{drop: 50%, drop_runs: 5, items: {{min: 1}}}}
    alerts:
      every: 1h
      timeout: 2s
      webhooks: [{{url: "http://127.0.0.1:{hook}/alerts"}}]
      email: {{smtp: "127.0.0.1:{smtp}", from: geoscrape@example.org, to: [ops@example.org]}}
{extract}
"""


def shrinking_shop(region: str, host: str, path: str, hit: int) -> Answer:
    count = 2 if region == "eu" else 10  # eu lost 80% of its items (a broken page?)
    return 200, [], html("".join(card(f"P{i}", f"Item {i}", 10.0 + i) for i in range(count)))


def seed_history(db_url: str) -> None:
    """Five earlier succeeded runs of 10 items per region, through the real writer."""
    from regions.messages import RunFinished, RunQueued, RunStats
    from storage.db import make_engine, session_factory
    from storage.migrate import ensure_schema
    from storage.writer import apply_message

    ensure_schema(db_url)
    engine = make_engine(db_url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with session_factory(engine).begin() as session:
        for region in ("eu", "us"):
            for day in range(5):
                run_id, at = f"old-{region}-{day}", start + timedelta(days=day)
                common = {"run_id": run_id, "site": "mon", "region": region}
                apply_message(session, RunQueued(**common, queued_at=at))
                stats = RunStats(pages=1, items=10, status_codes={"200": 1})
                apply_message(
                    session, RunFinished(**common, status="succeeded", finished_at=at, stats=stats)
                )
    engine.dispose()


class Mailbox:
    """An aiosmtpd handler that keeps what it is sent."""

    def __init__(self) -> None:
        self.mails: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(bytes(envelope.content))
        return "250 OK"


class Receiver(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.posts.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def run_statuses(s: Stack) -> dict[str, list[str]]:
    with s.sessions()() as session:
        rows = session.execute(
            select(runs.c.region, runs.c.status)
            .where(runs.c.site == "mon", ~runs.c.id.startswith("old-"))
            .order_by(runs.c.queued_at)
        ).all()
    found: dict[str, list[str]] = {}
    for region, status in rows:
        found.setdefault(region, []).append(status)
    return found


def alert_rows(s: Stack) -> list[tuple[str, str, str, str]]:
    with s.sessions()() as session:
        rows = session.execute(
            select(alerts.c.region, alerts.c.reason, alerts.c.sink, alerts.c.status).order_by(
                alerts.c.id
            )
        ).all()
    return [(r, reason, next(iter(sink)), st) for r, reason, sink, st in rows]


def test_a_region_whose_items_drop_is_degraded_and_alerted_once_without_holding_up_ingest(
    tmp_path: Path, vhost_url: str, sqlite_url: str
) -> None:
    hook_port, smtp_port = free_port(), free_port()
    # The webhook receiver is "down" at first: it accepts connections and never answers.
    hanging = socket.socket()
    hanging.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hanging.bind(("127.0.0.1", hook_port))
    hanging.listen(16)
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    Receiver.posts = []
    config = MON_CONFIG.format(port=free_port(), hook=hook_port, smtp=smtp_port, extract=EXTRACT)
    seed_history(sqlite_url)
    with ExitStack() as cleanup:
        cleanup.callback(smtp.stop)
        cleanup.callback(hanging.close)
        ports = cleanup.enter_context(region_views(["eu", "us"], shrinking_shop))
        s = cleanup.enter_context(stack(tmp_path, vhost_url, sqlite_url, config))
        s.ingest()
        for region, port in ports.items():
            regional_worker(s, region, port)

        done = s.cli("crawl", "mon", "--wait", "--timeout", "120", timeout=180)
        assert done.returncode == 1, done.stdout + done.stderr  # a degraded run is no success
        assert run_statuses(s) == {"eu": ["degraded"], "us": ["succeeded"]}
        shown = s.cli("runs", "--site", "mon", "--status", "degraded")
        assert shown.returncode == 0, shown.stderr
        assert "degraded" in shown.stdout and "more than 50% below" in shown.stdout, shown.stdout
        with s.sessions()() as session:
            [(reasons,)] = session.execute(
                select(runs.c.reasons).where(runs.c.status == "degraded")
            ).all()
        assert reasons == [
            {
                "check": "drop",
                "message": "2 items, more than 50% below the median 10 of the last 5 runs",
            }
        ]

        # The e-mail arrives; the webhook alert waits for its receiver, retried.
        wait_until(lambda: mailbox.mails, timeout=60, what="the alert e-mail")
        assert b"mon/eu degraded: drop" in mailbox.mails[0]
        assert alert_rows(s) == [
            ("eu", "drop", "webhook", "pending"),
            ("eu", "drop", "email", "sent"),
        ]

        # Ingest is not held up meanwhile: a second round is written in full,
        # and the same reason is not alerted again within `every`.
        again = s.cli("crawl", "mon", "--wait", "--timeout", "120", timeout=180)
        assert again.returncode == 1, again.stdout + again.stderr
        assert run_statuses(s) == {"eu": ["degraded"] * 2, "us": ["succeeded"] * 2}
        assert alert_rows(s)[0][3] == "pending" and len(alert_rows(s)) == 2

        # The receiver comes up: exactly one webhook, for eu only.
        hanging.close()
        receiver = ThreadingHTTPServer(("127.0.0.1", hook_port), Receiver)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        cleanup.callback(receiver.server_close)
        cleanup.callback(receiver.shutdown)
        wait_until(lambda: alert_rows(s)[0][3] == "sent", timeout=150, what="the webhook delivered")
        assert [(p["site"], p["region"], p["status"], p["reason"]) for p in Receiver.posts] == [
            ("mon", "eu", "degraded", "drop")
        ]
        assert len(mailbox.mails) == 1


# --- the Scrapy engine: the same evidence, nothing taken from a block page -------------


def test_scrapy_engine_records_digests_and_follows_nothing_from_a_block_page() -> None:
    from tests.test_crawl import Run, make_job

    wall = CAPTCHA_WALL.replace(b"</form>", b'</form><a href="/real.html">real</a>')
    real = html(card("P9", "Item P9", 9.0))

    def render(region: str, host: str, path: str, hit: int) -> Answer:
        return 200, [], wall if path == "/" else real

    with region_views(["site"], render) as ports:
        base = f"http://127.0.0.1:{ports['site']}"
        job = make_job(
            start_urls=[f"{base}/", f"{base}/real.html?direct=1"],
            follow={"allow": ["."]},
            keep_bodies=True,
            extract={
                "items": "div.product",
                "key": "sku",
                "fields": {"sku": {"css": "::attr(data-sku)"}},
            },
        )
        run = Run(job)
    assert run.finished.status == "succeeded", run.finished.error
    by_url = {f.url: f for f in run.fetches}
    assert set(by_url) == {f"{base}/", f"{base}/real.html?direct=1"}  # the wall's link: no
    wall_fetch = by_url[f"{base}/"]
    assert (wall_fetch.block, wall_fetch.bytes) == ("recaptcha", len(wall))
    assert wall_fetch.sha256 == hashlib.sha256(wall).hexdigest()
    assert wall_fetch.body is not None and base64.b64decode(wall_fetch.body) == wall
    assert by_url[f"{base}/real.html?direct=1"].block is None
    assert [i.key for i in run.items] == ["P9"]  # only the real page's item
