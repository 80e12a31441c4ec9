"""A region's egress on its worker: which exits exist, which are verified, fail closed.

A region's `egress` (sites.yaml) lists proxy exits, or none for the worker's
own network. With `verify`, the worker proves each exit before its first job
and every `verify.every`: it fetches `echo_url` through the exit, learns the
exit's public address, and checks it against `verify.networks` and against
every geoip database (the country must match in all of them; a database that
does not know the address fails the exit). Only verified exits carry jobs; a
region with none verified consumes nothing (regions/worker.py).

Without `verify`, the exits are used as configured and every run is attested
as unverified. Proxy credentials stay in this process and its crawl children
(scraper.egress); everything that leaves it carries `redact_proxy` labels.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import maxminddb
import requests

from regions.messages import EgressAttestation, ExitAttestation, ExitReport, utcnow
from scheduler.config import Egress, GeoIP, redact_proxy
from scraper.egress import ChildEgress, Exit
from scraper.errors import ScraperError

log = logging.getLogger("geoscrape.egress")

ECHO_TIMEOUT = 15.0  # seconds, the whole echo request through one exit
ECHO_MAX_BYTES = 4096


class EgressError(ScraperError):
    """An egress exit could not be verified (the message says why)."""


@dataclass
class ExitState:
    proxy: str | None  # the full URL (credentials included): never logged or sent
    label: str
    address: str | None = None
    countries: dict[str, str | None] = field(default_factory=dict)
    verified: bool = False
    since: datetime | None = None
    reason: str | None = "not verified yet"
    latency: float | None = None
    checked_at: datetime | None = None

    def report(self) -> ExitReport:
        return ExitReport(
            proxy=self.label,
            address=self.address,
            countries=dict(self.countries),
            verified=self.verified,
            since=self.since,
            reason=self.reason,
            latency=self.latency,
        )


def echo_address(body: bytes) -> str:
    """The caller's address from an echo answer: plain text, or JSON {"ip": ...}."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["ip"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EgressError(f"echo answer is JSON without an 'ip' ({exc})") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise EgressError(f"echo answer is not an IP address: {text[:80]!r}") from None


class Verifier:
    """Checks one exit address against networks and every geoip database."""

    def __init__(self, egress: Egress, geoip: GeoIP | None) -> None:
        assert egress.verify is not None
        self.verify = egress.verify
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.verify.networks]
        self.databases = list(geoip.databases) if geoip is not None else []

    def fetch_address(self, proxy: str | None) -> str:
        proxies = {"http": proxy, "https": proxy} if proxy else {}
        try:
            with requests.Session() as session:
                session.trust_env = False  # only this exit, never an environment proxy
                response = session.get(
                    self.verify.echo_url, proxies=proxies, timeout=ECHO_TIMEOUT, stream=True
                )
                body = response.raw.read(ECHO_MAX_BYTES, decode_content=True)
                response.close()
        except requests.RequestException as exc:
            name = type(exc).__name__
            raise EgressError(f"echo request failed ({name})") from None
        if response.status_code != 200:
            raise EgressError(f"echo answered HTTP {response.status_code}")
        return echo_address(body)

    def countries(self, address: str) -> dict[str, str | None]:
        """database file name -> ISO country of `address` (None: unknown to it).

        Databases are reopened on every check, so fixing a file needs no restart.
        """
        found: dict[str, str | None] = {}
        for path in self.databases:
            name = os.path.basename(path)
            try:
                with maxminddb.open_database(path) as reader:
                    record = reader.get(address)
            except (OSError, ValueError) as exc:
                raise EgressError(f"geoip database {name} unreadable: {exc}") from None
            country = record.get("country") if isinstance(record, dict) else None
            code = country.get("iso_code") if isinstance(country, dict) else None
            found[name] = str(code) if code else None
        return found

    def check(self, state: ExitState) -> None:
        """Verify `state`'s exit now, updating it in place (never raises)."""
        started = time.monotonic()
        verified, reason = False, None
        try:
            state.address = self.fetch_address(state.proxy)
            state.countries = self.countries(state.address)
            reason = self.problem(state.address, state.countries)
            verified = reason is None
        except EgressError as exc:
            reason = str(exc)
            state.countries = {} if state.address is None else state.countries
        state.latency = round(time.monotonic() - started, 3)
        state.checked_at = utcnow()
        if verified != state.verified or state.since is None:
            state.since = state.checked_at
        state.verified, state.reason = verified, reason
        if verified:
            log.info("exit %s verified: %s in %s", state.label, state.address, self.verify.country)
        else:
            log.warning("exit %s NOT verified: %s", state.label, reason)

    def problem(self, address: str, countries: dict[str, str | None]) -> str | None:
        ip = ipaddress.ip_address(address)
        if not countries:  # fail closed: nothing to check the country against
            return "no geoip database to check the country against"
        if self.networks and not any(ip in net for net in self.networks):
            nets = ", ".join(str(n) for n in self.networks)
            return f"address {address} is outside the allowed networks ({nets})"
        for name, country in countries.items():
            if country is None:
                return f"address {address} is unknown to geoip database {name}"
            if country != self.verify.country:
                return f"address {address} is in {country} per {name}, not {self.verify.country}"
        return None


class RegionEgress:
    """The exits of one region on this worker, and their verification loop."""

    def __init__(self, egress: Egress | None, geoip: GeoIP | None) -> None:
        self.egress = egress or Egress()
        proxies: list[str | None] = list(self.egress.proxies) or [None]
        self.states = [
            ExitState(proxy=p, label="direct" if p is None else redact_proxy(p)) for p in proxies
        ]
        self.verifier = Verifier(self.egress, geoip) if self.egress.verify else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Called after a round that changed an exit's verdict (the worker sends
        # a heartbeat then, so `geoscrape status` need not wait for the next one).
        self.on_change: Callable[[], object] | None = None

    @property
    def verifying(self) -> bool:
        return self.verifier is not None

    def verify_all(self) -> None:
        """One verification round over every exit (no-op without `verify`)."""
        if self.verifier is None:
            return
        changed = False
        for state in self.states:
            probe = ExitState(**{**state.__dict__, "countries": dict(state.countries)})
            self.verifier.check(probe)
            with self._lock:
                changed |= (probe.verified, probe.reason) != (state.verified, state.reason)
                state.__dict__.update(probe.__dict__)
        if changed and self.on_change is not None:
            self.on_change()

    def usable(self) -> list[ExitState]:
        """The exits a job may use now: the verified ones, or all when not verifying."""
        with self._lock:
            if self.verifier is None:
                return list(self.states)
            return [s for s in self.states if s.verified]

    def open(self) -> bool:
        """May this worker take a job now (some exit usable)?"""
        return bool(self.usable())

    def for_job(self) -> tuple[ChildEgress, EgressAttestation] | None:
        """The exits of one crawl and their attestation; None when none is usable."""
        usable = self.usable()
        if not usable:
            return None
        chosen = usable if self.egress.rotate == "per-request" else usable[:1]
        child = ChildEgress(
            rotate=self.egress.rotate,
            exits=[Exit(proxy=s.proxy, address=s.address) for s in chosen],
        )
        attestation = EgressAttestation(
            verified=self.verifier is not None,
            rotate=self.egress.rotate,
            exits=[
                ExitAttestation(
                    proxy=s.label,
                    address=s.address,
                    country=self.verifier.verify.country if self.verifier else None,
                    verified=s.verified,
                    verified_at=s.checked_at if s.verified else None,
                )
                for s in chosen
            ],
        )
        return child, attestation

    def reports(self) -> list[ExitReport] | None:
        """Every exit's state for the heartbeat; None for a direct, unverified region."""
        if self.verifier is None and not self.egress.proxies:
            return None
        with self._lock:
            return [s.report() for s in self.states]

    def start(self) -> RegionEgress:
        """Verify now (blocking: before the first job), then every `verify.every`."""
        if self.verifier is None:
            return self
        self.verify_all()
        every = self.verifier.verify.every
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self._thread.name = "egress-verify"
        self._thread.start()
        return self

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.verify_all()
            except Exception:  # the loop must survive anything; exits stay as they were
                log.exception("egress verification round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=ECHO_TIMEOUT * len(self.states) + 5)
