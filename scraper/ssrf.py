"""The SSRF guard: which URLs and addresses a crawl may connect to.

By default a crawl refuses every non-http(s) scheme (`file:`, `data:`...) and
every address in a loopback, private, link-local (cloud metadata), CGNAT or
unique-local network. A site (or `defaults`) may allow specific hosts
(`allow_hosts: ["127.0.0.1:8801"]`, with or without a port) or networks
(`allow_networks: ["10.20.0.0/16"]`); everything else stays refused.

The check runs on the *resolved* addresses of every request, redirects
included, and again at connect time inside each engine (scrapy: the Twisted
name resolver drops refused addresses; requests: urllib3's connection
factory), so DNS that changes its answer between check and connect does not
get through either.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from regions.site import ResolvedSite, parse_allow_host
from scraper.errors import ScraperError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})
REFUSED = "refused by SSRF guard"

BLOCKED_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network": connects to the local host on Linux
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8",  # private
        "172.16.0.0/12",  # private
        "192.168.0.0/16",  # private
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "100.64.0.0/10",  # carrier-grade NAT
        "::/128",  # unspecified
        "::1/128",  # loopback
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
    )
)


class SSRFRefused(ScraperError, OSError):
    """A URL or address the guard refuses (an OSError, so HTTP clients treat it
    as a failed connection and never send anything)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{REFUSED}: {reason}")


def _plain(address: Address) -> Address:
    """IPv4-mapped IPv6 (::ffff:10.0.0.1) is checked as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Guard:
    """The allow-list of one site; `check_*` raise SSRFRefused."""

    hosts: frozenset[tuple[str, int | None]] = frozenset()
    networks: tuple[Network, ...] = ()
    blocked: tuple[Network, ...] = field(default=BLOCKED_NETWORKS)
    # Egress proxies named in the config: the crawl may *connect* to them,
    # but they are never allowed as a target URL.
    proxies: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def for_site(cls, site: ResolvedSite) -> Guard:
        return cls.build(site.allow_hosts, site.allow_networks)

    @classmethod
    def build(cls, allow_hosts: Iterable[str] = (), allow_networks: Iterable[str] = ()) -> Guard:
        return cls(
            hosts=frozenset(parse_allow_host(h) for h in allow_hosts),
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks),
        )

    def with_proxies(self, endpoints: Iterable[tuple[str, int]]) -> Guard:
        return replace(self, proxies=frozenset((h.lower(), p) for h, p in endpoints))

    def proxy_allowed(self, host: str, port: int) -> bool:
        return (host.lower().strip("[]"), port) in self.proxies

    def host_allowed(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return (host, None) in self.hosts or (host, port) in self.hosts

    def address_allowed(self, address: str, port: int, host: str | None = None) -> bool:
        """May we connect to `address`:`port` (which `host` resolved to)?"""
        try:
            ip = _plain(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return False
        if host is not None and self.host_allowed(host, port):
            return True
        if self.host_allowed(str(ip), port):
            return True
        if any(ip in net for net in self.networks):
            return True
        return not any(ip in net for net in self.blocked)

    def check_address(self, address: str, port: int, host: str | None = None) -> None:
        if not self.address_allowed(address, port, host):
            where = address if host in (None, address) else f"{host} ({address})"
            raise SSRFRefused(f"{where}:{port} is a private/loopback/link-local address")

    def check_url(self, url: str, *, resolve: bool = True) -> None:
        """Refuse a URL by scheme, then by every address its host resolves to."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise SSRFRefused(f"scheme {scheme + ':' if scheme else '(none)'} is not http(s)")
        host = parts.hostname
        if not host:
            raise SSRFRefused(f"no host in {url[:200]!r}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise SSRFRefused(f"bad port in {url[:200]!r}") from None
        if self.host_allowed(host, port):
            return
        if not resolve:
            return
        for address in resolve_host(host, port):
            self.check_address(address, port, host)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []  # the engine reports the DNS failure itself
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
