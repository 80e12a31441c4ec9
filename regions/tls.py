"""TLS for the bus: amqps:// broker URLs with a CA, client certificate and key.

A region in another cloud reaches the central RabbitMQ over the internet, so
its URL is ``amqps://user:pass@broker.example:5671/vhost`` and the files come
from the environment (never from sites.yaml):

    GEOSCRAPE_BROKER_CA     CA bundle that signed the broker's certificate
                            (default: the system's trusted CAs)
    GEOSCRAPE_BROKER_CERT   client certificate (PEM), when the broker asks for one
    GEOSCRAPE_BROKER_KEY    its private key (PEM); required with _CERT

The broker's certificate is always verified, hostname included.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from regions.errors import RegionsError
from regions.settings import env_name, settings

ENV_CA, ENV_CERT, ENV_KEY = (env_name(f) for f in ("broker_ca", "broker_cert", "broker_key"))
TLS_SCHEMES = ("amqps", "pyamqps")


class TLSConfigError(RegionsError):
    """Inconsistent or missing TLS settings for the broker connection."""


def _file(var: str, path: Path | None) -> str | None:
    if path is not None and not path.is_file():
        raise TLSConfigError(f"{var}={path}: no such file")
    return None if path is None else str(path)


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme in TLS_SCHEMES


def ssl_options(url: str) -> dict[str, Any] | None:
    """kombu/py-amqp `ssl=` options for `url`, or None for a plain amqp:// URL."""
    env = settings()
    ca = _file(ENV_CA, env.broker_ca)
    cert, key = _file(ENV_CERT, env.broker_cert), _file(ENV_KEY, env.broker_key)
    if not is_tls(url):
        given = [var for var, value in ((ENV_CA, ca), (ENV_CERT, cert), (ENV_KEY, key)) if value]
        if given:
            # Refuse rather than silently talk plain AMQP with TLS material lying around.
            raise TLSConfigError(
                f"{', '.join(given)} set but GEOSCRAPE_BROKER_URL is not amqps://; "
                "use an amqps:// URL or unset them"
            )
        return None
    if bool(cert) != bool(key):
        raise TLSConfigError(f"{ENV_CERT} and {ENV_KEY} must be given together")
    options: dict[str, Any] = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": urlsplit(url).hostname,
    }
    if ca:
        options["ca_certs"] = ca
    if cert:
        options["certfile"] = cert
        options["keyfile"] = key
    return options
