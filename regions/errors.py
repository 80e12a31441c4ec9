"""Exceptions of the regions package; RegionsError is the root."""

from __future__ import annotations


class RegionsError(Exception):
    """Root of every error raised by the regions package."""


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
