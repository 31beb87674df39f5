"""Certificates made on the spot for TLS tests: a CA, a client certificate
it signed, and an encrypted server key."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def client_ca(directory: Path) -> dict[str, Path]:
    """ca.pem, and client.pem + client.key signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("zion test CA", ca_key, "zion test CA", ca_key, ca=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("test client", client_key, "zion test CA", ca_key, ca=False)
    paths = {"ca": directory / "ca.pem", "cert": directory / "client.pem",
             "key": directory / "client.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(client_key))
    return paths


def encrypted_server_key(directory: Path, password: bytes) -> dict[str, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("localhost", key, "localhost", key, ca=False)
    paths = {"cert": directory / "server.pem", "key": directory / "server.key"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(key, password))
    return paths


def rsa_server_cert(directory: Path) -> dict[str, Path]:
    """An RSA-2048 self-signed server certificate: with it, a TLS 1.2 ECDHE
    group is free of the certificate's own curve (RFC 8422 5.1: an ECDSA
    certificate's curve must be one the client offered)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(
        _name("localhost")).public_key(key.public_key()).serial_number(
        x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    paths = {"cert": directory / "rsa.pem", "key": directory / "rsa.key"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths
