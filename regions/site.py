"""The resolved site a job carries: what a worker runs (the `config` of a Job).

These models are part of the wire contract (regions/messages.py): the
dispatcher builds a ResolvedSite from sites.yaml (scheduler.config), a job
carries it as JSON, and the worker, ingest and the store validate it back.
Every semantic check lives in a validator (selectors compile, regexes
compile, fields agree), so a config is checked the same whichever way it is
built: from YAML by scheduler.loader, by Config.model_validate, or from a job
on the bus. Every model forbids unknown keys: a typo must be an error, never
ignored.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from regions.units import parse_duration, parse_rate, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]  # seconds
Rate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0)]  # requests per second
# What one shared rate budget covers (scraper/ratelimit.py): the registrable
# domain, the exact host, or the domain per egress address.
RateScope = Literal["domain", "host", "domain+exit"]
Size = Annotated[int, BeforeValidator(parse_size)]  # bytes

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEPLOYED_PREFIX = "deployed:"  # project: "deployed:NAME", a bundle from `geoscrape deploy`
SpiderArgs = dict[str, str | int | float | bool]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo in sites.yaml, or a job from a newer schema)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Politeness(StrictModel):
    delay: Duration = 0.25
    concurrency: int = Field(8, ge=1, le=256)
    robots: Literal["obey", "ignore"] = "obey"
    user_agent: str = "geoscrape (+https://github.com/geoscrape/geoscrape)"
    # Shared by every crawl of every worker and region (Redis): None = no shared cap.
    rate: Rate | None = None
    rate_scope: RateScope = "domain"
    max_retry_after: Duration = 300.0  # the longest pause a 429/503 Retry-After may impose


class Limits(StrictModel):
    max_pages: int = Field(1000, ge=1)
    max_depth: int = Field(5, ge=0)
    timeout: Duration = 30.0  # per request, the whole download (a drip cannot stretch it)
    max_bytes: Size = 10 * 1024 * 1024  # per response, after decompression
    max_redirects: int = Field(10, ge=0, le=100)  # per request
    max_links: int = Field(1000, ge=0)  # links followed from one page
    max_duration: Duration = 3600.0  # the whole crawl


def parse_allow_host(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port` or `[v6]:port` -> (lower-case host, port or None)."""
    text = entry.strip().lower()
    port: int | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {entry!r}: write [v6-address]:port")
        rest = rest[1:]
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
    else:
        host, rest = text, ""
    if rest:
        if not rest.isdigit() or not 0 < int(rest) < 65536:
            raise ValueError(f"bad port in {entry!r}")
        port = int(rest)
    if not host or any(c in host for c in "/ @?#"):
        raise ValueError(f"bad host {entry!r}: give a host name or address, optionally :port")
    return host, port


def _check_allow_host(entry: str) -> str:
    parse_allow_host(entry)
    return entry


def _check_allow_network(entry: str) -> str:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError as exc:
        raise ValueError(f"bad network {entry!r}: {exc}") from None
    return entry


# Validated per entry, so an error's location names the bad one.
AllowHosts = list[Annotated[str, AfterValidator(_check_allow_host)]]


AllowNetworks = list[Annotated[str, AfterValidator(_check_allow_network)]]


def check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return pattern


# Validated per item, so an error's location names the bad pattern's index.
Regexes = list[Annotated[str, AfterValidator(check_regex)]]


class Follow(StrictModel):
    allow: Regexes = []
    deny: Regexes = []
    max_depth: int | None = Field(None, ge=0)


@cache
def _css_translator() -> Any:
    from parsel.csstranslator import HTMLTranslator  # parsel's: knows ::text and ::attr(name)

    return HTMLTranslator()


def check_css(selector: str) -> str:
    from cssselect import SelectorError

    try:
        _css_translator().css_to_xpath(selector)
    except (SelectorError, ValueError) as exc:
        raise ValueError(f"invalid CSS selector {selector!r}: {exc}") from None
    return selector


def check_xpath(expression: str) -> str:
    from lxml import etree

    try:
        etree.XPath(expression)
    except (etree.XPathError, ValueError) as exc:  # ValueError: NUL or control characters
        raise ValueError(f"invalid XPath {expression!r}: {exc}") from None
    return expression


# Selectors compile when the model is built: a bad one is a config error, not a crawl failure.
CssSelector = Annotated[str, AfterValidator(check_css)]
XPathExpression = Annotated[str, AfterValidator(check_xpath)]

FieldType = Literal["str", "int", "float", "price"]


class ExtractField(StrictModel):
    css: CssSelector | None = None
    xpath: XPathExpression | None = None
    join: str | None = None  # join all matches with this; otherwise the first match
    type: FieldType = "str"

    @model_validator(mode="after")
    def _one_selector(self) -> ExtractField:
        if (self.css is None) == (self.xpath is None):
            raise ValueError("give exactly one of 'css' or 'xpath'")
        return self


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):(?!\d)")


def check_start_url(url: str) -> None:
    """ValueError for a start URL without a scheme (`127.0.0.1:8811/x`, `shop.test/x`)
    or an http(s) URL without a host: caught at check time, where it would
    otherwise fail only in the worker, with no fetch row. Other schemes
    (file:, data:) are left to the crawl's SSRF guard, which refuses them."""
    match = _SCHEME.match(url)
    if match is None:
        raise ValueError(
            f"start URL {url!r} has no scheme: write it as 'http://{url}' (or https://)"
        )
    if match.group(1).lower() in ("http", "https") and not urlsplit(url).hostname:
        raise ValueError(f"start URL {url!r} has no host")


class Extract(StrictModel):
    pages: Regexes = []  # extract only from pages whose URL matches one (default: all)
    items: CssSelector | None = None  # one item per matched node
    # Field that identifies an item across runs and regions (for a spider's
    # items: a key of the item; without it, a stable hash of the item).
    key: str | None = None
    # How pages are parsed: html (always, whatever the document claims: XHTML
    # with an XML declaration is still HTML) or xml (feeds, sitemaps).
    parser: Literal["html", "xml"] = "html"
    fields: dict[str, ExtractField] = {}  # required unless the site runs a spider

    @model_validator(mode="after")
    def _key_is_a_field(self) -> Extract:
        if self.fields and self.key is not None and self.key not in self.fields:
            raise ValueError(f"key {self.key!r} is not one of the fields")
        return self


BlockType = Literal["images", "fonts", "media", "stylesheets"]


class Browser(StrictModel):
    """`engine: browser` only: how long to let a page's scripts render it."""

    wait_for: CssSelector | None = None  # must appear (within limits.timeout)
    wait: Duration = 0.0  # then let scripts run this much longer
    block: list[BlockType] = []  # resource types never fetched (saves time and bytes)

    @field_validator("wait")
    @classmethod
    def _wait_not_negative(cls, wait: float) -> float:
        if wait < 0:
            raise ValueError("'wait' must not be negative")
        return wait


def parse_share(value: Any) -> Any:
    """A share in [0, 1] from "95%" or 0.95."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"not a percentage: {value!r} (use e.g. 5%)") from None
    return value


Share = Annotated[float, BeforeValidator(parse_share), Field(ge=0, le=1)]


class Tolerance(StrictModel):
    """How far two numbers may be apart and still count as equal: relative + absolute."""

    relative: float = Field(0.0, ge=0)  # a share of the larger magnitude
    absolute: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # "1%" is relative; a plain number is an absolute amount.
        if isinstance(value, str):
            return {"relative": parse_share(value)}
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"absolute": value}
        return value


class CompareSettings(StrictModel):
    """`compare:` on a site: how many samples per page, and how to read them."""

    samples: int = Field(1, ge=1, le=10)  # fetches of each page per run
    window: Duration = 10.0  # the samples of one page are taken within this time
    tolerance: Tolerance = Tolerance()


class BlockSignature(StrictModel):
    """A block page: every condition given must hold (body: any one pattern)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    kind: Literal["geo", "bot", "captcha", "redirect"] = "bot"
    status: list[int] = []  # empty: any status
    headers: dict[str, Annotated[str, AfterValidator(check_regex)]] = {}  # name -> regex
    body: Regexes = []  # any one matches (case-insensitive)
    redirect: Annotated[str, AfterValidator(check_regex)] | None = None  # on the final URL
    offsite: bool = False  # a redirect that left the host asked for (www. aside)

    @model_validator(mode="after")
    def _some_condition(self) -> BlockSignature:
        if not (self.status or self.headers or self.body or self.redirect or self.offsite):
            raise ValueError(
                "a signature needs at least one of status, headers, body, redirect, offsite"
            )
        return self


class Access(StrictModel):
    signatures: list[BlockSignature] = []  # checked before the built-in set


class ItemsExpectation(StrictModel):
    min: int = Field(0, ge=0)


class StatusExpectation(StrictModel):
    max_errors: Share = 1.0  # share of fetches that failed or answered >= 400


class Expect(StrictModel):
    """`expect:` on a site: per-region data-quality checks after every run."""

    items: ItemsExpectation | None = None
    coverage: dict[str, Share] = {}  # field -> least share of items with it non-empty
    drop: Share | None = None  # items below (1 - drop) x the median of the last runs
    drop_runs: int = Field(5, ge=1, le=100)  # how many earlier successful runs
    status: StatusExpectation | None = None


class Webhook(StrictModel):
    url: str = Field(pattern=r"^https?://")
    format: Literal["json", "slack"] = "json"


class Email(StrictModel):
    smtp: str  # host:port
    sender: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    starttls: bool = False

    @field_validator("smtp")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_allow_host(value)
        return value


class Alerts(StrictModel):
    """`alerts:` on a site: where degraded/failed/dead runs are reported."""

    every: Duration = 3600.0  # at most one alert per (site, region, reason) in this time
    timeout: Duration = 10.0  # per delivery attempt
    webhooks: list[Webhook] = []
    email: Email | None = None


def check_project(project: str) -> None:
    if project.startswith(DEPLOYED_PREFIX):
        if not re.match(NAME_PATTERN, project.removeprefix(DEPLOYED_PREFIX)):
            raise ValueError(f"'project': bundle name in {project!r} must match {NAME_PATTERN}")
    elif not project.strip():
        raise ValueError("'project' must not be empty")


class ResolvedSite(StrictModel):
    """A site with defaults applied: what a job carries and a worker runs."""

    name: str
    start_urls: list[str]
    engine: Literal["scrapy", "requests", "browser"]
    spider: str | None
    browser: Browser = Browser()  # used by engine 'browser' only
    follow: Follow | None
    extract: Extract | None
    politeness: Politeness
    limits: Limits
    # Defaults for jobs dispatched before the SSRF guard existed.
    allow_hosts: list[str] = []
    allow_networks: list[str] = []
    # Defaults for jobs dispatched before Scrapy projects were supported.
    project: str | None = None
    spider_args: SpiderArgs = {}
    # Defaults for jobs dispatched before issue 14 (docs/TRUST.md).
    compare: CompareSettings = CompareSettings()
    access: Access = Access()
    expect: Expect | None = None
    alerts: Alerts | None = None
    keep_bodies: bool = False
    # Set by the worker from its region's egress, never by the dispatcher.
    source_address: str | None = None
    distributed: bool = False
