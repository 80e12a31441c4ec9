"""A throwaway CA, the central broker's server certificate and a region's client certificate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca: tuple[str, ec.EllipticCurvePrivateKey] | None,
    dns_names: list[str] | None = None,
) -> x509.Certificate:
    """Signed by `ca` (name, key), or self-signed CA certificate when `ca` is None."""
    now = dt.datetime.now(dt.UTC)
    issuer, signer = ca or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if dns_names:
        sans = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names])
        builder = builder.add_extension(sans, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    # World-readable on purpose: the containers' users (rabbitmq, geoscrape) read them.
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".crt").chmod(0o644)
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.with_suffix(".key").write_bytes(pem)
        path.with_suffix(".key").chmod(0o644)


def make_pki(broker_dir: Path, region_dir: Path, broker_name: str, region: str) -> None:
    """broker_dir: ca.crt, server.crt/.key (for `broker_name`); region_dir: ca.crt, client.*."""
    for d in (broker_dir, region_dir):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    ca_name, ca_key = "geoscrape compose test CA", ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(broker_dir / "ca", ca, None)
    _write(region_dir / "ca", ca, None)
    server = _cert(broker_name, server_key, (ca_name, ca_key), [broker_name])
    _write(broker_dir / "server", server, server_key)
    client = _cert(f"region-{region}", client_key, (ca_name, ca_key))
    _write(region_dir / "client", client, client_key)
