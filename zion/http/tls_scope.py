"""The ASGI TLS extension (scope["extensions"]["tls"]) for connections that
were asked for a client certificate: made once per connection, and only
when --ssl-cert-reqs is on, so other connections pay nothing."""

from __future__ import annotations

import ssl
from typing import Any

_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": _subject(ssl_object.getpeercert()) if der else None,
        "client_cert_error": None,  # a certificate that fails verification fails the handshake
        "tls_version": _VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # Python's ssl names the cipher, not its IANA number
    }


def _subject(cert: Any) -> str | None:
    if not cert:
        return None
    # RFC 4514 order: most specific first.
    parts = [f"{key}={value}" for rdn in reversed(cert.get("subject", ())) for key, value in rdn]
    mapping = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
               "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
    return ",".join(mapping.get(p.split("=", 1)[0], p.split("=", 1)[0]) + "=" + p.split("=", 1)[1]
                    for p in parts) or None
