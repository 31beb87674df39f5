"""The bench's TLS, set up once for every server and every client.

Servers: one ECDSA P-256 certificate for localhost (make_cert), given to
every server under test. Clients: one client SSLContext recipe
(client_context) for every Python client here, and every client process
(wrk, openssl, h2load, this one) offering only X25519
(pin_clients_to_x25519), so the key exchange, which decides most of a full
handshake's cost, is the same whichever server answers."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CERTS = BENCH / ".work" / "certs"
PINNED_OPENSSL_CONF = BENCH / "openssl-x25519.cnf"


def make_cert() -> tuple[Path, Path]:
    cert, key = CERTS / "cert.pem", CERTS / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    CERTS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-out", str(cert),
                    "-days", "365", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True,
                   capture_output=True)
    return cert, key


def client_context() -> ssl.SSLContext:
    """Every Python client's context: the bench's self-signed certificate is
    not verified (loopback, and verifying costs the same for every server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pin_clients_to_x25519() -> None:
    """Every client offers only X25519 (bench/openssl-x25519.cnf). OpenSSL
    reads its config once, at start: re-exec so this process's own Python
    clients are pinned too, not only wrk and openssl that inherit it."""
    if os.environ.get("OPENSSL_CONF") != str(PINNED_OPENSSL_CONF):
        os.environ["OPENSSL_CONF"] = str(PINNED_OPENSSL_CONF)
        os.execv(sys.executable, [sys.executable, *sys.argv])
