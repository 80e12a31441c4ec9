"""amqps:// with a CA, client certificate and key from the environment.

The shared broker is never reconfigured: a TLS-terminating forwarder on
loopback (requiring a client certificate) sits in front of 127.0.0.1:5672,
with a throwaway CA made here with `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from geoscrape.forwarder import Forwarder
from geoscrape.testsite import Catalog, serve
from regions.bus import check_broker, connect, publish_ingest
from regions.errors import BrokerTLSError, BrokerUnavailable
from regions.tls import TLSConfigError, ssl_options
from tests.harness import stack

KEY_PEM = serialization.PrivateFormat.TraditionalOpenSSL


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
    *, ca: bool = False, sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, KEY_PEM, serialization.NoEncryption())
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, server.crt/.key (localhost, 127.0.0.1), client.crt/.key, other-ca.crt."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "ca", _cert("geoscrape test CA", ca_key, "geoscrape test CA", ca_key, ca=True), None)
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "other-ca", _cert("other CA", other_key, "other CA", other_key, ca=True), None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = _cert("localhost", server_key, "geoscrape test CA", ca_key, sans=sans)
    _write(d / "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "client", _cert("region-eu", client_key, "geoscrape test CA", ca_key), client_key)
    return d


@pytest.fixture
def tls_port(pki: Path) -> Iterator[int]:
    """A TLS listener on loopback, client certificate required, forwarding to RabbitMQ."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    with Forwarder(("127.0.0.1", 0), ("127.0.0.1", 5672), server_ssl=context) as fwd:
        yield fwd.port


def amqps(vhost_url: str, port: int) -> str:
    vhost = vhost_url.rsplit("/", 1)[1]
    return f"amqps://guest:guest@localhost:{port}/{vhost}"


@pytest.fixture
def tls_env(pki: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GEOSCRAPE_BROKER_CA", str(pki / "ca.crt"))
    monkeypatch.setenv("GEOSCRAPE_BROKER_CERT", str(pki / "client.crt"))
    monkeypatch.setenv("GEOSCRAPE_BROKER_KEY", str(pki / "client.key"))
    return pki


def test_round_trip_over_amqps_with_ca_and_client_certificate(
    tls_env: Path, tls_port: int, vhost_url: str
) -> None:
    from kombu import Connection

    from regions.bus import INGEST_QUEUE

    url = amqps(vhost_url, tls_port)
    check_broker(url)
    with Connection(vhost_url) as admin:
        INGEST_QUEUE(admin.default_channel).declare()
    with connect(url) as conn:
        assert conn.ssl, "the amqps URL must give the connection TLS options"
        publish_ingest(conn, {"kind": "tls", "n": 7})
        message = INGEST_QUEUE(conn.default_channel).get(no_ack=True)
        assert message is not None and message.payload == {"kind": "tls", "n": 7}
        assert conn.connection.transport.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_broker_certificate_from_an_unknown_ca_is_refused(
    tls_env: Path, tls_port: int, vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOSCRAPE_BROKER_CA", str(tls_env / "other-ca.crt"))
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        check_broker(amqps(vhost_url, tls_port))


def test_listener_requiring_a_client_certificate_refuses_none(
    tls_env: Path, tls_port: int, vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEOSCRAPE_BROKER_CERT")
    monkeypatch.delenv("GEOSCRAPE_BROKER_KEY")
    # Classified as a TLS failure (issue 16), with the password hidden.
    with pytest.raises(BrokerTLSError, match=r"TLS with RabbitMQ at amqps://guest:\*\*@"):
        check_broker(amqps(vhost_url, tls_port))


def test_tls_settings_errors_are_one_clear_line(
    tls_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = "amqps://u:p@broker.example:5671/geo"
    assert ssl_options(url) == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "broker.example",
        "ca_certs": str(tls_env / "ca.crt"),
        "certfile": str(tls_env / "client.crt"),
        "keyfile": str(tls_env / "client.key"),
    }
    with pytest.raises(TLSConfigError, match=r"^GEOSCRAPE_BROKER_CA, GEOSCRAPE_BROKER_CERT, "):
        ssl_options("amqp://u:p@broker.example/geo")  # TLS files but a plain URL
    monkeypatch.delenv("GEOSCRAPE_BROKER_KEY")
    with pytest.raises(TLSConfigError, match="must be given together"):
        ssl_options(url)
    monkeypatch.setenv("GEOSCRAPE_BROKER_KEY", "/nonexistent/client.key")
    config = tmp_path / "sites.yaml"
    config.write_text(
        'regions: {eu: {}}\nsites:\n  - {name: s, start_urls: ["http://x/"], regions: [eu],'
        ' extract: {fields: {t: {css: "title::text"}}}}\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", "worker", "--region", "eu", "-c", str(config)],
        env={**os.environ, "GEOSCRAPE_BROKER_URL": url},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "error: GEOSCRAPE_BROKER_KEY=/nonexistent/client.key: no such file"
    )


@pytest.mark.slow
def test_worker_and_ingest_run_a_crawl_over_amqps(
    tls_env: Path, tls_port: int, vhost_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    from storage.queries import list_items, list_runs

    catalog = Catalog(products=5)
    with serve(catalog=catalog) as shop:
        config = (
            "regions: {eu: {}}\ndefaults:\n  allow_networks: ['127.0.0.0/8']\n"
            "  politeness: {delay: 0, robots: ignore}\nsites:\n"
            f'  - name: tls\n    engine: requests\n    start_urls: ["{shop.url}/prices.html"]\n'
            "    regions: [eu]\n    extract:\n      items: div.product\n      key: sku\n"
            '      fields: {sku: {css: "::attr(data-sku)"},\n'
            '               price: {css: ".price::text", type: price}}\n'
        )
        with stack(tmp_path, amqps(vhost_url, tls_port), sqlite_url, config) as s:
            s.ingest()
            s.worker("eu")
            done = s.cli("crawl", "tls", "--wait", "--timeout", "90", timeout=150)
            assert done.returncode == 0, done.stdout + done.stderr
            with s.sessions()() as session:
                [run] = list_runs(session, site="tls")
                items = list_items(session, "tls")
            assert run.status == "succeeded"
            assert sorted((i.key, i.data["price"]) for i in items) == [
                (p.sku, p.price) for p in catalog.products
            ]
