"""Issue 14, pure units: block signatures, compare verdicts, config, monitors."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from regions.messages import ItemBatch, Job, RunFinished, RunQueued, RunStats, ScrapedItem
from regions.site import BlockSignature, CompareSettings, Tolerance
from scheduler.config import Config
from scheduler.loader import ConfigError, parse_config
from scraper.blocks import Page, builtin, match
from storage.access import Outcome, classify
from storage.compare import _verdict
from storage.db import make_engine, session_factory
from storage.migrate import ensure_schema
from storage.models import alerts, runs
from storage.writer import apply_message

# --- block signatures ----------------------------------------------------------------


def page(
    body: str, status: int = 200, headers: list[tuple[str, str]] | None = None, final: str = ""
) -> Page:
    url = "https://shop.example/p/1"
    return Page(url, final or url, status, headers or [], body.encode())


CF = [("Server", "cloudflare"), ("CF-RAY", "8a1b2c3d4e5f-FRA")]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (page("<h1>Error 1009</h1> Access denied", 403, CF), "cloudflare-country-ban"),
        (page("Sorry, you have been blocked", 403, CF), "cloudflare-blocked"),
        (page("<title>Just a moment...</title>", 503, CF), "cloudflare-challenge"),
        (
            page("<title>Access Denied</title> ... Reference #18.4f2a3b17.1700000000.1a2b3c", 403),
            "akamai-access-denied",
        ),
        (page("Request unsuccessful. Incapsula incident ID: 123", 200), "imperva-incapsula"),
        (page('<script src="https://ct.captcha-delivery.com/c.js"></script>', 403), "datadome"),
        (page('<div id="px-captcha"></div>', 403), "perimeterx"),
        (page('<div class="h-captcha" data-sitekey="x"></div>', 200), "hcaptcha"),
        (page('<div class="g-recaptcha"></div>', 200), "recaptcha"),  # a 200 is still a block
        (page("solve me", 200, final="https://shop.example/captcha?next=/p/1"), "captcha-url"),
        (page("<h1>Shop DE</h1>", 200, final="https://de.shop-eu.example/p/1"), "country-redirect"),
        # not blocks: a real page, a www. redirect, a 403 with no known body
        (page('<div class="product">Real</div>'), None),
        (page("<h1>Shop</h1>", 200, final="https://www.shop.example/p/1"), None),
        (page("Forbidden", 403), None),
        # cloudflare's ban wording without cloudflare's server header is not cloudflare
        (page("Error 1009 banned the country or region", 403), None),
    ],
)
def test_builtin_signatures_name_each_block_page(response: Page, expected: str | None) -> None:
    found = match(response)
    assert (found.name if found else None) == expected


def test_the_signature_set_is_versioned_and_a_sites_own_come_first() -> None:
    assert builtin().version >= 1
    own = BlockSignature(name="shop-wall", status=[200], body=["please wait, human"])
    found = match(page('please wait, human <div class="g-recaptcha">'), [own])
    assert found is not None and found.name == "shop-wall"


# --- compare verdicts ------------------------------------------------------------------

NONE = Tolerance()


@pytest.mark.parametrize(
    ("sets", "tolerance", "missing", "expected"),
    [
        ({"eu": [10.0], "us": [10.0]}, NONE, False, "same"),
        ({"eu": [10.0], "us": [12.0]}, NONE, False, "differs"),
        ({"eu": [10.0, 12.0], "us": [12.0, 10.0]}, NONE, False, "noisy"),
        ({"eu": [10.0, 12.0], "us": [15.0]}, NONE, False, "differs"),  # beyond the spread
        ({"eu": [10.0, 12.0], "us": [11.0]}, NONE, False, "noisy"),  # inside it
        ({"eu": [10.0], "us": [10.05]}, Tolerance(relative=0.01), False, "same"),
        ({"eu": [10.0], "us": [10.5]}, Tolerance(relative=0.01), False, "differs"),
        ({"eu": [10.0], "us": [10.5]}, Tolerance(absolute=1), False, "same"),
        ({"eu": ["A"], "us": ["A", "B"]}, NONE, False, "noisy"),
        ({"eu": ["A"], "us": ["B"]}, NONE, False, "differs"),
        ({"eu": ["A"]}, NONE, True, "missing"),
        ({"eu": [None], "us": [10.0]}, NONE, False, "differs"),
    ],
)
def test_compare_verdict_of_value_sets(
    sets: dict[str, list[object]], tolerance: Tolerance, missing: bool, expected: str
) -> None:
    assert _verdict(sets, tolerance, missing) == expected


def test_compare_settings_read_percentages_and_amounts() -> None:
    settings = CompareSettings.model_validate({"samples": 3, "window": "2s", "tolerance": "1%"})
    assert (settings.samples, settings.window, settings.tolerance) == (
        3,
        2.0,
        Tolerance(relative=0.01),
    )
    assert CompareSettings.model_validate({"tolerance": 0.5}).tolerance == Tolerance(absolute=0.5)


# --- access verdicts cite the signature ---------------------------------------------------

URL = "https://shop.example/p/1"


def test_access_cites_signatures_and_redirect_targets() -> None:
    cells = classify(
        {
            "eu": [Outcome(URL, 200)],
            "us": [Outcome(URL, 403, block="cloudflare-country-ban")],
            "asia": [Outcome(URL, 200, block="recaptcha")],
            "au": [Outcome(URL, 200, final_url="https://shop.example.de/p/1", block="x")],
        }
    )
    assert {r: c.label for r, c in cells.items()} == {
        "eu": "ok",
        "us": "geo-blocked (cloudflare-country-ban)",
        "asia": "geo-blocked (recaptcha)",
        "au": "redirected (→ shop.example.de)",
    }
    everywhere = classify({r: [Outcome(URL, 403, block="datadome")] for r in ("eu", "us")})
    assert {c.label for c in everywhere.values()} == {"bot-blocked (datadome)"}
    plain = classify({r: [Outcome(URL, 403)] for r in ("eu", "us")})
    assert {c.label for c in plain.values()} == {"blocked-everywhere"}


# --- config ---------------------------------------------------------------------------------

SITE = """\
regions:
  eu: {}
sites:
  - name: shop
    engine: requests
    start_urls: ["https://shop.example/"]
    regions: [eu]
    extract:
      fields:
        price: {css: ".price::text", type: price}
"""


def load(extra: str, engine: str = "requests") -> Config:
    text = SITE.replace("engine: requests", f"engine: {engine}") + textwrap.indent(extra, "    ")
    return parse_config(text, "sites.yaml", env={})


def problems(extra: str, engine: str = "requests") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(extra, engine)
    return [str(p) for p in info.value.problems]


def test_trust_settings_reach_the_job() -> None:
    config = load(
        "compare: {samples: 2, tolerance: 1%}\n"
        "access: {signatures: [{name: shop-wall, status: [200], body: ['human check']}]}\n"
        "expect: {items: {min: 5}, coverage: {price: 95%}, drop: 50%, status: {max_errors: 5%}}\n"
        "alerts: {every: 30m, webhooks: [{url: 'http://hooks.example/x', format: slack}],\n"
        "         email: {smtp: 'mail.example:25', from: a@example.org, to: [b@example.org]}}\n"
        "keep_bodies: true\n"
    )
    site = config.resolved_site("shop")
    assert site.compare.samples == 2 and site.compare.tolerance.relative == 0.01
    assert site.access.signatures[0].name == "shop-wall"
    assert site.expect is not None and site.expect.coverage == {"price": 0.95}
    assert (site.expect.drop, site.expect.status and site.expect.status.max_errors) == (0.5, 0.05)
    assert site.alerts is not None and site.alerts.every == 1800
    assert site.alerts.email is not None and site.alerts.email.sender == "a@example.org"
    assert site.keep_bodies is True
    # What a worker gets back from the job validates to the same site.
    again = type(site).model_validate(site.model_dump(mode="json"))
    assert again == site


@pytest.mark.parametrize(
    ("extra", "engine", "expected"),
    [
        (
            "compare: {samples: 2}\n",
            "scrapy",
            "sites.yaml:4: site 'shop': compare.samples > 1 needs engine 'requests' (for now)",
        ),
        (
            "access: {signatures: [{name: x, body: ['(']}]}\n",
            "requests",
            "sites.yaml:11: site 'shop': access.signatures[0].body[0]: invalid regex",
        ),
        (
            "expect: {drop: lots}\n",
            "requests",
            "sites.yaml:11: site 'shop': expect.drop: ",
        ),
        (
            "alerts: {webhooks: [{url: 'ftp://x'}]}\n",
            "requests",
            "sites.yaml:11: site 'shop': alerts.webhooks[0].url: ",
        ),
        (
            "expect: {itemz: {min: 1}}\n",
            "requests",
            "sites.yaml:11: site 'shop': expect.itemz: unknown key (did you mean 'items'?)",
        ),
    ],
)
def test_trust_settings_errors_name_file_line_and_field(
    extra: str, engine: str, expected: str
) -> None:
    [problem] = problems(extra, engine)
    assert problem.startswith(expected), problem


# --- monitors: evaluated by the writer ------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    ensure_schema(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def job(run_id: str, expect: dict[str, Any], alerts_cfg: dict[str, Any] | None) -> Job:
    site = load("").resolved_site("shop").model_dump(mode="json")
    config = site | {"expect": expect, "alerts": alerts_cfg}
    return Job(run_id=run_id, site="shop", region="eu", config=config)


def finish(
    session: Session,
    run_id: str,
    at: datetime,
    items: int,
    status: Literal["succeeded", "failed"] = "succeeded",
    errors: int = 0,
    expect: dict[str, Any] | None = None,
    alerts_cfg: dict[str, Any] | None = None,
) -> None:
    """One run of site shop in eu, through the writer; every other item lacks a price."""
    ids = {"run_id": run_id, "site": "shop", "region": "eu"}
    config = job(run_id, expect, alerts_cfg) if expect else None
    apply_message(session, RunQueued(**ids, queued_at=at, job=config))
    batch = [
        ScrapedItem(key=f"k{i}", url="u", data={"price": None if i % 2 else 1.0})
        for i in range(items)
    ]
    apply_message(session, ItemBatch(**ids, seq=0, observed_at=at, items=batch))
    stats = RunStats(pages=10, items=items, errors=errors, status_codes={"200": 10 - errors})
    apply_message(session, RunFinished(**ids, status=status, finished_at=at, stats=stats))


def test_each_expectation_degrades_a_run_with_its_reason(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        for day in range(3):
            finish(session, f"h{day}", T0 + timedelta(days=day), items=10)
        finish(
            session,
            "now",
            T0 + timedelta(days=5),
            items=4,
            errors=2,
            expect={
                "items": {"min": 5},
                "coverage": {"price": 0.9},
                "drop": 0.5,
                "status": {"max_errors": 0.1},
            },
        )
        finish(session, "fine", T0 + timedelta(days=6), items=10, expect={"drop": 0.5})
    with sessions() as session:
        got = dict(session.execute(select(runs.c.id, runs.c.reasons)).all())
        status = dict(session.execute(select(runs.c.id, runs.c.status)).all())
    assert status["now"] == "degraded" and status["fine"] == "succeeded"
    assert [r["check"] for r in got["now"]] == ["items", "coverage:price", "drop", "status"]
    assert got["fine"] is None


def test_alerts_are_enqueued_once_per_reason_within_every(
    sessions: sessionmaker[Session],
) -> None:
    hooks = {"every": 3600, "webhooks": [{"url": "http://127.0.0.1:9/x"}]}
    with sessions.begin() as session:
        for day in range(3):
            finish(session, f"h{day}", T0 + timedelta(days=day), items=10)
        for n in range(3):  # three degraded runs in a row: one alert
            finish(session, f"d{n}", T0 + timedelta(days=4, minutes=n), items=1,
                   expect={"drop": 0.5}, alerts_cfg=hooks)  # fmt: skip
        finish(session, "f", T0 + timedelta(days=4, minutes=5), items=0, status="failed",
               expect={"drop": 0.5}, alerts_cfg=hooks)  # fmt: skip
        # a redelivered verdict changes nothing
        finish(session, "f", T0 + timedelta(days=4, minutes=5), items=0, status="failed",
               expect={"drop": 0.5}, alerts_cfg=hooks)  # fmt: skip
    with sessions() as session:
        rows = session.execute(select(alerts.c.run_id, alerts.c.reason)).all()
    assert sorted(rows) == [("d0", "drop"), ("f", "failed")]


def test_samples_digests_and_bodies_are_stored_apart(sessions: sessionmaker[Session]) -> None:
    from regions.messages import Fetch
    from storage.compare import extra_samples
    from storage.models import bodies, items, observations
    from storage.runinfo import run_fetches

    ids = {"run_id": "r", "site": "shop", "region": "eu"}
    digest = "ab" * 32
    batch = ItemBatch(
        **ids,
        seq=0,
        observed_at=T0,
        items=[
            ScrapedItem(key="k", url="u", data={"price": 1.0}),
            ScrapedItem(key="k", url="u", data={"price": 2.0}, sample=1),
        ],
        fetches=[
            Fetch(url="u", status=200, bytes=3, sha256=digest, body="YWJj", headers=[("A", "b")]),
            Fetch(url="u", status=200, bytes=3, sha256=digest, sample=1, block="recaptcha"),
        ],
    )
    with sessions.begin() as session:
        apply_message(session, batch)
        apply_message(session, batch)  # a redelivery adds nothing
    with sessions() as session:
        assert session.execute(select(items.c.data)).scalars().all() == [{"price": 1.0}]
        assert len(session.execute(select(observations.c.id)).all()) == 1
        assert extra_samples(session, "r") == {"k": [{"price": 2.0}]}
        assert [(f.sample, f.sha256, f.block) for f in run_fetches(session, "r").fetches] == [
            (0, digest, None),
            (1, digest, "recaptcha"),
        ]
        assert session.execute(select(bodies.c.body, bodies.c.headers)).all() == [
            (b"abc", [["A", "b"]])
        ]


def test_equal_digests_answer_identical_everywhere() -> None:
    from storage.access import identical

    def outs(*digests: str | None) -> list[Outcome]:
        return [Outcome(f"{URL}?{i}", 200, sha256=d) for i, d in enumerate(digests)]

    assert identical({"eu": outs("a", "b"), "us": outs("a", "b")}) is True
    assert identical({"eu": outs("a", "b"), "us": outs("a", "c")}) is False
    assert identical({"eu": outs("a"), "us": outs(None)}) is None  # no digest: no answer
    assert identical({"eu": outs("a")}) is None  # one region: nothing to compare


def test_batches_with_kept_bodies_are_cut_by_size() -> None:
    from regions.messages import Fetch
    from scraper.batching import MAX_BODY_CHARS, Batcher

    batcher = Batcher("r", "shop", "eu", max_entries=100)
    body = "A" * (MAX_BODY_CHARS // 2)
    assert batcher.add_fetch(Fetch(url="u1", status=200, body=body)) is None
    batch = batcher.add_fetch(Fetch(url="u2", status=200, body=body))
    assert batch is not None and [f.url for f in batch.fetches] == ["u1", "u2"]
    assert batcher.add_fetch(Fetch(url="u3", status=200)) is None  # the count starts over


def test_slack_webhooks_get_a_text_and_refusals_are_delivery_errors() -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from regions.site import Webhook
    from storage.alerts import AlertDeliveryError, Sink, deliver

    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200 if self.path == "/ok" else 500)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    message = {"site": "shop", "region": "eu", "run_id": "r1", "status": "degraded",
               "reason": "drop", "detail": "2 items", "at": "now"}  # fmt: skip
    try:
        deliver(Sink(webhook=Webhook(url=f"{base}/ok", format="slack")), message)
        assert got == [{"text": "geoscrape: run r1 of shop in eu degraded: drop: 2 items"}]
        with pytest.raises(AlertDeliveryError, match="HTTP 500"):
            deliver(Sink(webhook=Webhook(url=f"{base}/broken")), message)
        assert got[-1] == message  # the generic JSON
    finally:
        server.shutdown()
        server.server_close()
