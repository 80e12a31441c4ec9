"""The exits a crawl child may use, handed over by its worker (scraper/verify.py).

The worker passes them in the child's environment (EGRESS_ENV), never in the
Job: a job travels over the broker and is stored centrally, and proxy URLs
carry credentials. With no exits the child uses its own network, as before.

Fail closed: once a crawl has exits it never falls back to the direct network.
An exit that fails under `per-request` rotation is dropped and the request
goes out through the next one; under `per-run` the run fails with the proxy
error (`Exits.failure`).

This module must not import Scrapy or Twisted (the runner imports it).
"""

from __future__ import annotations

import os
import threading
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from scheduler.config import redact_proxy

EGRESS_ENV = "GEOSCRAPE_EGRESS"


class Exit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # None: the worker's own network (a verified direct region). Never logged:
    # it holds the credentials; `label` is the redacted form.
    proxy: str | None = Field(repr=False)
    address: str | None = None  # its verified public address

    @property
    def label(self) -> str:
        return "direct" if self.proxy is None else redact_proxy(self.proxy)

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) of the proxy, which the SSRF guard lets the crawl connect to."""
        if self.proxy is None:
            return None
        parts = urlsplit(self.proxy)
        assert parts.hostname is not None and parts.port is not None  # config-validated
        return parts.hostname.lower(), parts.port


class ChildEgress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rotate: Literal["per-run", "per-request"] = "per-run"
    exits: list[Exit] = []


class NoExitLeft(OSError):
    """Every exit of the crawl failed: nothing may go out (never the direct network)."""


class Exits:
    """The crawl's live exits, shared by the engine's threads/callbacks."""

    def __init__(self, egress: ChildEgress) -> None:
        self.rotate = egress.rotate
        self._live = [e for e in egress.exits if e.proxy is not None]
        self._all = list(egress.exits)
        self._next = 0
        self._lock = threading.Lock()
        self.failure: str | None = None  # the proxy error that ended a per-run crawl

    @property
    def exits(self) -> list[Exit]:
        return list(self._all)

    @property
    def proxied(self) -> bool:
        return bool(self._live) or any(e.proxy is not None for e in self._all)

    def endpoints(self) -> list[tuple[str, int]]:
        return [ep for e in self._all if (ep := e.endpoint) is not None]

    def pick(self) -> Exit | None:
        """The exit for the next request; None for the direct network; NoExitLeft."""
        if not self.proxied:
            return self._all[0] if self._all else None
        with self._lock:
            if not self._live:
                raise NoExitLeft(self.failure or "every egress proxy of this crawl failed")
            if self.rotate == "per-run":
                return self._live[0]
            chosen = self._live[self._next % len(self._live)]
            self._next += 1
            return chosen

    def failed(self, exit_: Exit, error: str) -> bool:
        """`exit_` failed with `error`: True when the request may go out again (another exit)."""
        with self._lock:
            if exit_ in self._live:
                self._live.remove(exit_)
            message = f"egress proxy {exit_.label} failed: {error}"
            if self.rotate == "per-run":
                self._live.clear()  # per-run: the crawl ends with its exit
            if not self._live:
                self.failure = self.failure or message
                return False
            return True


def from_env() -> Exits:
    """The exits the worker gave this crawl child (none: the direct network)."""
    text = os.environ.pop(EGRESS_ENV, "")  # popped: a spider's subprocess must not inherit it
    egress = ChildEgress.model_validate_json(text) if text else ChildEgress()
    return Exits(egress)
