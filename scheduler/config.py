"""Typed models for sites.yaml (the config contract in docs/ARCHITECTURE.md).

Every model forbids unknown keys: a typo must be an error, never ignored.
Site-level `politeness` and `limits` are merged over `defaults` by
`Config.resolved_site`, so a job always carries a complete, explicit config.
"""

from __future__ import annotations

import ipaddress
import re
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
from pydantic_core import PydanticCustomError

from scheduler.units import parse_duration, parse_rate, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]  # seconds
Rate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0)]  # requests per second
# What one shared rate budget covers (scraper/ratelimit.py): the registrable
# domain, the exact host, or the domain per egress address.
RateScope = Literal["domain", "host", "domain+exit"]
Size = Annotated[int, BeforeValidator(parse_size)]  # bytes

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEPLOYED_PREFIX = "deployed:"  # project: "deployed:NAME", a bundle from `geoscrape deploy`
SpiderArgs = dict[str, str | int | float | bool]
DUPLICATE_SITE_ERROR = "duplicate_site_name"  # pydantic error type of a repeated site name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_timezone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)"
        ) from None
    return name


def _check_cron(expression: str) -> str:
    from scheduler.schedule import check_cron  # the fire-time module owns cron parsing

    check_cron(expression)
    return expression


class Schedule(_Model):
    every: Duration | None = None
    cron: Annotated[str, AfterValidator(_check_cron)] | None = None
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "UTC"
    jitter: Duration = 0.0
    # A run of the same site and region still queued or running at the next
    # tick: skip that tick (recorded as a skipped run) or queue it anyway.
    overlap: Literal["skip", "queue"] = "skip"
    # After every beat was down: fire the most recent missed tick, or none.
    catchup: Literal["latest", "none"] = "latest"
    # Neither `every` nor `cron` (e.g. `schedule: {}` on a site): manual only.

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if self.every is not None and self.cron is not None:
            raise ValueError("give either 'every' or 'cron', not both")
        if self.every is not None and self.every <= 0:
            raise ValueError("'every' must be positive")
        if self.jitter < 0:
            raise ValueError("'jitter' must not be negative")
        return self


class Politeness(_Model):
    delay: Duration = 0.25
    concurrency: int = Field(8, ge=1, le=256)
    robots: Literal["obey", "ignore"] = "obey"
    user_agent: str = "geoscrape (+https://github.com/geoscrape/geoscrape)"
    # Shared by every crawl of every worker and region (Redis): None = no shared cap.
    rate: Rate | None = None
    rate_scope: RateScope = "domain"
    max_retry_after: Duration = 300.0  # the longest pause a 429/503 Retry-After may impose


class Limits(_Model):
    max_pages: int = Field(1000, ge=1)
    max_depth: int = Field(5, ge=0)
    timeout: Duration = 30.0  # per request, the whole download (a drip cannot stretch it)
    max_bytes: Size = 10 * 1024 * 1024  # per response, after decompression
    max_redirects: int = Field(10, ge=0, le=100)  # per request
    max_links: int = Field(1000, ge=0)  # links followed from one page
    max_duration: Duration = 3600.0  # the whole crawl


class PolitenessOverride(_Model):
    delay: Duration | None = None
    concurrency: int | None = Field(None, ge=1, le=256)
    robots: Literal["obey", "ignore"] | None = None
    user_agent: str | None = None
    rate: Rate | None = None
    rate_scope: RateScope | None = None
    max_retry_after: Duration | None = None


class LimitsOverride(_Model):
    max_pages: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=0)
    timeout: Duration | None = None
    max_bytes: Size | None = None
    max_redirects: int | None = Field(None, ge=0, le=100)
    max_links: int | None = Field(None, ge=0)
    max_duration: Duration | None = None


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


PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


def _check_proxy_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in PROXY_SCHEMES:
        shown = f"{parts.scheme}:" if parts.scheme else "(none)"
        raise ValueError(
            f"proxy scheme {shown} is not one of {', '.join(PROXY_SCHEMES)} "
            f"(in {redact_proxy(url)!r})"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in proxy {redact_proxy(url)!r}") from None
    if not parts.hostname or port is None:
        raise ValueError(f"proxy {redact_proxy(url)!r} needs a host and a port")
    return url


def redact_proxy(url: str) -> str:
    """A proxy URL without its password: safe for logs, messages, the store and the API."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if user else host))


def _check_country(code: str) -> str:
    import pycountry

    if len(code) != 2 or pycountry.countries.get(alpha_2=code.upper()) is None:
        raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code (e.g. DE, US)")
    return code.upper()


ProxyUrl = Annotated[str, AfterValidator(_check_proxy_url)]
CountryCode = Annotated[str, AfterValidator(_check_country)]


class Verify(_Model):
    """How a worker proves where its exits leave from (scraper/verify.py)."""

    echo_url: str  # answers with the caller's address: plain text or JSON {"ip": ...}
    country: CountryCode
    networks: AllowNetworks = []  # optional: the exit address must be inside one
    every: Duration = 600.0

    @field_validator("echo_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"echo_url must be an http(s) URL (got {url!r})")
        return url

    @field_validator("every")
    @classmethod
    def _positive(cls, every: float) -> float:
        if every <= 0:
            raise ValueError("'every' must be positive")
        return every


def _check_source_address(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"bad source address {address!r}: give an IPv4 or IPv6 address") from None
    return address


class Egress(_Model):
    """Where a region's traffic leaves from: worker-local, never sent in a job."""

    # The local address the crawl's connections come from (a machine with
    # several public addresses; the demo gives each region its own 127.0.0.x).
    source_address: Annotated[str, AfterValidator(_check_source_address)] | None = None
    # None: the worker's own network (today's behaviour).
    proxies: list[ProxyUrl] = []
    # per-run: one exit for a whole crawl; per-request: rotate, and fail over.
    rotate: Literal["per-run", "per-request"] = "per-run"
    verify: Verify | None = None


class Region(_Model):
    """A region workers are pinned to, and how its traffic leaves (egress)."""

    description: str | None = None
    egress: Egress = Egress()


def _check_geoip_database(path: str) -> str:
    import maxminddb

    try:
        maxminddb.open_database(path).close()
    except (OSError, ValueError) as exc:  # ValueError: maxminddb.InvalidDatabaseError
        raise ValueError(f"cannot read geoip database {path!r}: {exc}") from None
    return path


class GeoIP(_Model):
    # MaxMind DB files; with several, an exit must geolocate the same in all.
    databases: list[Annotated[str, AfterValidator(_check_geoip_database)]] = Field(min_length=1)


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return pattern


# Validated per item, so an error's location names the bad pattern's index.
Regexes = list[Annotated[str, AfterValidator(_check_regex)]]


class Follow(_Model):
    allow: Regexes = []
    deny: Regexes = []
    max_depth: int | None = Field(None, ge=0)


FieldType = Literal["str", "int", "float", "price"]


class ExtractField(_Model):
    css: str | None = None
    xpath: str | None = None
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


class Extract(_Model):
    pages: Regexes = []  # extract only from pages whose URL matches one (default: all)
    items: str | None = None  # CSS selector: one item per matched node
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


class Browser(_Model):
    """`engine: browser` only: how long to let a page's scripts render it."""

    wait_for: str | None = None  # CSS selector that must appear (within limits.timeout)
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


class Tolerance(_Model):
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


class CompareSettings(_Model):
    """`compare:` on a site: how many samples per page, and how to read them."""

    samples: int = Field(1, ge=1, le=10)  # fetches of each page per run
    window: Duration = 10.0  # the samples of one page are taken within this time
    tolerance: Tolerance = Tolerance()


class BlockSignature(_Model):
    """A block page: every condition given must hold (body: any one pattern)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    kind: Literal["geo", "bot", "captcha", "redirect"] = "bot"
    status: list[int] = []  # empty: any status
    headers: dict[str, Annotated[str, AfterValidator(_check_regex)]] = {}  # name -> regex
    body: Regexes = []  # any one matches (case-insensitive)
    redirect: Annotated[str, AfterValidator(_check_regex)] | None = None  # on the final URL
    offsite: bool = False  # a redirect that left the host asked for (www. aside)

    @model_validator(mode="after")
    def _some_condition(self) -> BlockSignature:
        if not (self.status or self.headers or self.body or self.redirect or self.offsite):
            raise ValueError(
                "a signature needs at least one of status, headers, body, redirect, offsite"
            )
        return self


class Access(_Model):
    signatures: list[BlockSignature] = []  # checked before the built-in set


class ItemsExpectation(_Model):
    min: int = Field(0, ge=0)


class StatusExpectation(_Model):
    max_errors: Share = 1.0  # share of fetches that failed or answered >= 400


class Expect(_Model):
    """`expect:` on a site: per-region data-quality checks after every run."""

    items: ItemsExpectation | None = None
    coverage: dict[str, Share] = {}  # field -> least share of items with it non-empty
    drop: Share | None = None  # items below (1 - drop) x the median of the last runs
    drop_runs: int = Field(5, ge=1, le=100)  # how many earlier successful runs
    status: StatusExpectation | None = None


class Webhook(_Model):
    url: str = Field(pattern=r"^https?://")
    format: Literal["json", "slack"] = "json"


class Email(_Model):
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


class Alerts(_Model):
    """`alerts:` on a site: where degraded/failed/dead runs are reported."""

    every: Duration = 3600.0  # at most one alert per (site, region, reason) in this time
    timeout: Duration = 10.0  # per delivery attempt
    webhooks: list[Webhook] = []
    email: Email | None = None


class Defaults(_Model):
    schedule: Schedule | None = None
    # Manual crawls (`geoscrape crawl`): a job no worker started within this
    # expires (RabbitMQ message TTL), as a scheduled one does at its next tick.
    expires: Duration = Field(3600.0, gt=0)
    politeness: Politeness = Politeness()
    limits: Limits = Limits()
    # SSRF guard: loopback/private/link-local/metadata addresses are refused
    # unless listed here (every site) or on the site (that site only).
    allow_hosts: AllowHosts = []
    allow_networks: AllowNetworks = []


class Site(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    start_urls: list[str] = []
    regions: list[str] = Field(min_length=1)
    engine: Literal["scrapy", "requests", "browser"] = "scrapy"
    # An existing Scrapy spider: "package.module:SpiderClass" (or a dotted
    # path), or with `project` also a spider name of that project.
    spider: str | None = None
    schedule: Schedule | None = None
    follow: Follow | None = None
    extract: Extract | None = None
    politeness: PolitenessOverride = PolitenessOverride()
    limits: LimitsOverride = LimitsOverride()
    allow_hosts: AllowHosts = []  # added to defaults.allow_hosts
    allow_networks: AllowNetworks = []  # added to defaults.allow_networks
    # A Scrapy project run with its own settings (docs/PROJECTS.md): a
    # directory with scrapy.cfg, a settings module, or "deployed:NAME".
    project: str | None = None
    spider_args: SpiderArgs = {}  # passed to the spider, as `scrapy crawl -a`
    browser: Browser | None = None  # engine 'browser' only
    compare: CompareSettings = CompareSettings()
    access: Access = Access()
    expect: Expect | None = None
    alerts: Alerts | None = None
    keep_bodies: bool = False  # store response bodies (for `export --kind warc`)
    # One run shared by the region's free workers, its frontier in Redis (scraper/frontier.py).
    distributed: bool = False

    @model_validator(mode="after")
    def _runnable(self) -> Site:
        if self.spider is None:
            if not self.start_urls:
                raise ValueError("'start_urls' is required unless 'spider' is given")
            if self.extract is None or not self.extract.fields:
                raise ValueError("'extract' with 'fields' is required unless 'spider' is given")
            if self.project is not None or self.spider_args:
                raise ValueError("'project' and 'spider_args' need a 'spider'")
        elif self.project is None and ":" not in self.spider and "." not in self.spider:
            raise ValueError(
                "'spider' must look like 'package.module:SpiderClass' "
                "(a bare spider name needs 'project')"
            )
        if self.project is not None:
            _check_project(self.project)
            if self.politeness != PolitenessOverride():
                raise ValueError(
                    "a 'project' site is polite as its settings.py says; drop 'politeness'"
                )
        if self.engine == "requests" and self.follow is not None:
            raise ValueError("engine 'requests' fetches the listed URLs only; drop 'follow'")
        if self.browser is not None and self.engine != "browser":
            raise ValueError("'browser' settings need 'engine: browser'")
        if self.engine == "browser" and self.spider is not None:
            raise ValueError("engine 'browser' runs the generic spider; drop 'spider'")
        if self.compare.samples > 1 and (self.engine != "requests" or self.spider is not None):
            raise ValueError("compare.samples > 1 needs engine 'requests' (for now)")
        if self.distributed and (self.engine != "scrapy" or self.spider is not None):
            raise ValueError("'distributed' needs engine 'scrapy' with the generic spider")
        return self

    @field_validator("start_urls")
    @classmethod
    def _absolute_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            check_start_url(url)
        return urls

    @field_validator("regions")
    @classmethod
    def _distinct_regions(cls, regions: list[str]) -> list[str]:
        # A field validator (not the model one) so it is reported with other errors.
        if len(set(regions)) != len(regions):
            raise ValueError("'regions' lists a region twice")
        return regions


def _check_project(project: str) -> None:
    if project.startswith(DEPLOYED_PREFIX):
        if not re.match(NAME_PATTERN, project.removeprefix(DEPLOYED_PREFIX)):
            raise ValueError(f"'project': bundle name in {project!r} must match {NAME_PATTERN}")
    elif not project.strip():
        raise ValueError("'project' must not be empty")


class ResolvedSite(_Model):
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


def _check_region_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"region name {name!r} must match {NAME_PATTERN}")
    return name


# Validated per key, so an error's location names the bad region.
RegionName = Annotated[str, AfterValidator(_check_region_name)]


class Config(_Model):
    regions: dict[RegionName, Region | None]
    geoip: GeoIP | None = None
    defaults: Defaults = Defaults()
    sites: list[Site] = []

    @field_validator("regions")
    @classmethod
    def _some_region(cls, regions: dict[str, Any]) -> dict[str, Any]:
        if not regions:
            raise ValueError("declare at least one region")
        return regions

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        seen: set[str] = set()
        for site in self.sites:
            if site.name in seen:
                # A distinct type lets scheduler.loader, which reports this with
                # the exact line itself, recognise and skip it.
                raise PydanticCustomError(
                    DUPLICATE_SITE_ERROR,
                    "site name '{name}' is used twice",
                    {"name": site.name},
                )
            seen.add(site.name)
        for name, region in self.regions.items():
            if region and region.egress and region.egress.verify and self.geoip is None:
                raise ValueError(
                    f"region {name!r}: egress.verify needs 'geoip.databases' to check the country"
                )
        return self

    def egress(self, region: str) -> Egress | None:
        declared = self.regions.get(region)
        return declared.egress if declared is not None else None

    def region(self, name: str) -> Region:
        """The settings of a declared region (`eu: {}` and `eu:` both give the defaults)."""
        return self.regions[name] or Region()

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        known = ", ".join(s.name for s in self.sites) or "none"
        raise KeyError(f"no site named {name!r} (known: {known})")

    def resolved_site(self, name: str) -> ResolvedSite:
        site = self.site(name)
        politeness = self.defaults.politeness.model_copy(
            update=site.politeness.model_dump(exclude_none=True)
        )
        limits = self.defaults.limits.model_copy(update=site.limits.model_dump(exclude_none=True))
        return ResolvedSite(
            name=site.name,
            start_urls=site.start_urls,
            engine=site.engine,
            spider=site.spider,
            browser=site.browser or Browser(),
            follow=site.follow,
            extract=site.extract,
            politeness=politeness,
            limits=limits,
            allow_hosts=_union(self.defaults.allow_hosts, site.allow_hosts),
            allow_networks=_union(self.defaults.allow_networks, site.allow_networks),
            project=site.project,
            spider_args=site.spider_args,
            compare=site.compare,
            access=site.access,
            expect=site.expect,
            alerts=site.alerts,
            keep_bodies=site.keep_bodies,
            distributed=site.distributed,
        )


def _union(first: list[str], second: list[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))
