"""Typed models for sites.yaml (the config contract in docs/ARCHITECTURE.md).

The YAML-facing models: sites with their overrides, defaults, regions and
their egress, schedules. What a job carries (the resolved site and the models
it uses) is part of the wire contract and lives in regions/site.py;
`Config.resolved_site` merges a site's `politeness` and `limits` over
`defaults`, so a job always carries a complete, explicit config. Every check
is a validator, so `Config.model_validate` checks what scheduler.loader does
(the loader adds YAML parsing, its caps and FILE:LINE). Every model forbids
unknown keys: a typo must be an error, never ignored.
"""

from __future__ import annotations

import ipaddress
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ModelWrapValidatorHandler,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from regions.site import (
    NAME_PATTERN,
    Access,
    Alerts,
    AllowHosts,
    AllowNetworks,
    Browser,
    CompareSettings,
    Duration,
    Expect,
    Extract,
    Follow,
    Limits,
    Politeness,
    Rate,
    RateScope,
    ResolvedSite,
    Size,
    SpiderArgs,
    StrictModel,
    check_project,
    check_start_url,
)

DUPLICATE_SITE_ERROR = "duplicate_site_name"  # pydantic error type of a repeated site name


@dataclass
class _ConfigScope:
    """What the sites of the Config being validated check against: a site alone
    cannot know the declared regions or its siblings' names. Per-field checks
    (not a Config model validator), so they are reported together with every
    other error, each at its own location."""

    declared: tuple[str, ...] | None = None  # None: `regions` did not validate
    names: dict[str, int] = field(default_factory=dict)  # site name -> index of its first site
    index: int = -1  # the site being validated


_scope: ContextVar[_ConfigScope | None] = ContextVar("config_scope", default=None)


def _check_declared(region: str) -> str:
    scope = _scope.get()
    if scope is not None and scope.declared is not None and region not in scope.declared:
        names = [d if d.isprintable() and d.strip() else repr(d) for d in scope.declared]
        raise ValueError(
            f"region {region!r} is not declared under 'regions' (declared: {', '.join(names)})"
        )
    return region


def _check_unique_name(name: str) -> str:
    scope = _scope.get()
    if scope is not None:
        first = scope.names.setdefault(name, scope.index)
        if first != scope.index:
            # A distinct type (with the first site's index) lets scheduler.loader
            # name the first site's line.
            raise PydanticCustomError(
                DUPLICATE_SITE_ERROR,
                "site name '{name}' is already used by site #{first}",
                {"name": name, "first": first},
            )
    return name


def _next_site(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    scope = _scope.get()
    if scope is not None:
        scope.index += 1
    return handler(value)


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


class Schedule(StrictModel):
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


class PolitenessOverride(StrictModel):
    delay: Duration | None = None
    concurrency: int | None = Field(None, ge=1, le=256)
    robots: Literal["obey", "ignore"] | None = None
    user_agent: str | None = None
    rate: Rate | None = None
    rate_scope: RateScope | None = None
    max_retry_after: Duration | None = None


class LimitsOverride(StrictModel):
    max_pages: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=0)
    timeout: Duration | None = None
    max_bytes: Size | None = None
    max_redirects: int | None = Field(None, ge=0, le=100)
    max_links: int | None = Field(None, ge=0)
    max_duration: Duration | None = None


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


class Verify(StrictModel):
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


class Egress(StrictModel):
    """Where a region's traffic leaves from: worker-local, never sent in a job."""

    # The local address the crawl's connections come from (a machine with
    # several public addresses; the demo gives each region its own 127.0.0.x).
    source_address: Annotated[str, AfterValidator(_check_source_address)] | None = None
    # None: the worker's own network (today's behaviour).
    proxies: list[ProxyUrl] = []
    # per-run: one exit for a whole crawl; per-request: rotate, and fail over.
    rotate: Literal["per-run", "per-request"] = "per-run"
    verify: Verify | None = None


class Region(StrictModel):
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


class GeoIP(StrictModel):
    # MaxMind DB files; with several, an exit must geolocate the same in all.
    databases: list[Annotated[str, AfterValidator(_check_geoip_database)]] = Field(min_length=1)


class Defaults(StrictModel):
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


class Site(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_check_unique_name)]
    start_urls: list[str] = []
    # In a Config, each must be declared under its `regions` (per item: the
    # error names the bad one).
    regions: list[Annotated[str, AfterValidator(_check_declared)]] = Field(min_length=1)
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
            check_project(self.project)
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


def _check_region_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"region name {name!r} must match {NAME_PATTERN}")
    return name


# Validated per key, so an error's location names the bad region.
RegionName = Annotated[str, AfterValidator(_check_region_name)]


class Config(StrictModel):
    regions: dict[RegionName, Region | None]
    geoip: GeoIP | None = None
    defaults: Defaults = Defaults()
    sites: list[Annotated[Site, WrapValidator(_next_site)]] = []

    @model_validator(mode="wrap")
    @classmethod
    def _with_scope(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        token = _scope.set(_ConfigScope())
        try:
            return handler(data)
        finally:
            _scope.reset(token)

    @field_validator("regions")
    @classmethod
    def _some_region(cls, regions: dict[str, Any]) -> dict[str, Any]:
        if not regions:
            raise ValueError("declare at least one region")
        scope = _scope.get()
        if scope is not None:  # validated before `sites` (field order), which check against it
            scope.declared = tuple(regions)
        return regions

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
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
