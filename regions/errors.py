"""Exceptions of the regions package; RegionsError is the root."""

from __future__ import annotations

from typing import Any


class RegionsError(Exception):
    """Root of every error raised by the regions package."""


class SettingsError(RegionsError):
    """A GEOSCRAPE_* environment variable whose value cannot be used (regions/settings.py)."""


class UnknownRegion(RegionsError):
    """A region that sites.yaml does not declare."""


class BrokerUnavailable(RegionsError):
    """RabbitMQ cannot be used: one of the classified reasons below."""


class BrokerUnreachable(BrokerUnavailable):
    """Nothing answers at the broker's address (refused, timed out, unknown host)."""


class BrokerLoginRefused(BrokerUnavailable):
    """RabbitMQ refused the user name or password (AMQP 403)."""


class BrokerVhostMissing(BrokerUnavailable):
    """The URL's vhost does not exist, or the user may not use it (AMQP 530)."""


class BrokerTLSError(BrokerUnavailable):
    """The TLS handshake with the broker failed (certificate, CA, protocol)."""


class BadSourceAddress(RegionsError):
    """A region's egress.source_address that this machine cannot send from."""


class CrawlAborted(RegionsError):
    """The worker aborted a crawl before it finished (a second stop signal, a cancel).

    Everything the crawl sent so far (items, fetches) was published; no
    RunFinished was: the caller decides what becomes of the run.
    """

    def __init__(self, run_id: str, pages: int, items: int, stats: Any = None) -> None:
        super().__init__(f"run {run_id}: crawl aborted after {pages} pages, {items} items")
        self.run_id = run_id
        self.pages = pages
        self.items = items
        self.stats = stats  # the crawl's RunStats so far (None: unknown)
