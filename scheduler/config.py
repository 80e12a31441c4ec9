"""Typed models for sites.yaml (the config contract in docs/ARCHITECTURE.md).

Every model forbids unknown keys: a typo must be an error, never ignored.
Site-level `politeness` and `limits` are merged over `defaults` by
`Config.resolved_site`, so a job always carries a complete, explicit config.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

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
DUPLICATE_SITE_ERROR = "duplicate_site_name"  # pydantic error type of a repeated site name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Region(_Model):
    """A region workers are pinned to. Extra settings arrive with later features."""

    description: str | None = None


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


class Extract(_Model):
    pages: Regexes = []  # extract only from pages whose URL matches one (default: all)
    items: str | None = None  # CSS selector: one item per matched node
    key: str | None = None  # field that identifies an item across runs and regions
    fields: dict[str, ExtractField]

    @model_validator(mode="after")
    def _key_is_a_field(self) -> Extract:
        if not self.fields:
            raise ValueError("'fields' must name at least one field")
        if self.key is not None and self.key not in self.fields:
            raise ValueError(f"key {self.key!r} is not one of the fields")
        return self


class Defaults(_Model):
    schedule: Schedule | None = None
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
    engine: Literal["scrapy", "requests"] = "scrapy"
    spider: str | None = None  # "package.module:SpiderClass", an existing Scrapy spider
    schedule: Schedule | None = None
    follow: Follow | None = None
    extract: Extract | None = None
    politeness: PolitenessOverride = PolitenessOverride()
    limits: LimitsOverride = LimitsOverride()
    allow_hosts: AllowHosts = []  # added to defaults.allow_hosts
    allow_networks: AllowNetworks = []  # added to defaults.allow_networks
    # One run shared by the region's free workers, its frontier in Redis (scraper/frontier.py).
    distributed: bool = False

    @model_validator(mode="after")
    def _runnable(self) -> Site:
        if self.spider is None:
            if not self.start_urls:
                raise ValueError("'start_urls' is required unless 'spider' is given")
            if self.extract is None:
                raise ValueError("'extract' is required unless 'spider' is given")
        elif ":" not in self.spider:
            raise ValueError("'spider' must look like 'package.module:SpiderClass'")
        if self.engine == "requests" and self.follow is not None:
            raise ValueError("engine 'requests' fetches the listed URLs only; drop 'follow'")
        if self.distributed and (self.engine != "scrapy" or self.spider is not None):
            raise ValueError("'distributed' needs engine 'scrapy' with the generic spider")
        return self

    @field_validator("regions")
    @classmethod
    def _distinct_regions(cls, regions: list[str]) -> list[str]:
        # A field validator (not the model one) so it is reported with other errors.
        if len(set(regions)) != len(regions):
            raise ValueError("'regions' lists a region twice")
        return regions


class ResolvedSite(_Model):
    """A site with defaults applied: what a job carries and a worker runs."""

    name: str
    start_urls: list[str]
    engine: Literal["scrapy", "requests"]
    spider: str | None
    follow: Follow | None
    extract: Extract | None
    politeness: Politeness
    limits: Limits
    # Defaults for jobs dispatched before the SSRF guard existed.
    allow_hosts: list[str] = []
    allow_networks: list[str] = []
    distributed: bool = False


def _check_region_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"region name {name!r} must match {NAME_PATTERN}")
    return name


# Validated per key, so an error's location names the bad region.
RegionName = Annotated[str, AfterValidator(_check_region_name)]


class Config(_Model):
    regions: dict[RegionName, Region | None]
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
        return self

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
            follow=site.follow,
            extract=site.extract,
            politeness=politeness,
            limits=limits,
            allow_hosts=_union(self.defaults.allow_hosts, site.allow_hosts),
            allow_networks=_union(self.defaults.allow_networks, site.allow_networks),
            distributed=site.distributed,
        )


def _union(first: list[str], second: list[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))
