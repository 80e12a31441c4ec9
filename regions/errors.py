"""Exceptions of the regions package; RegionsError is the root."""

from __future__ import annotations


class RegionsError(Exception):
    """Root of every error raised by the regions package."""


class UnknownRegion(RegionsError):
    """A region that sites.yaml does not declare."""


class BrokerUnavailable(RegionsError):
    """RabbitMQ cannot be reached."""


class BadSourceAddress(RegionsError):
    """A region's egress.source_address that this machine cannot send from."""
