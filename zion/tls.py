"""TLS: the one server SSLContext, and the self-signed default certificate.

The master builds the context before it forks any worker. OpenSSL generates
an SSL_CTX's session-ticket keys when the context is created and never
rotates them on its own, so every forked worker inherits the same keys: a
ticket issued by worker 0 resumes on worker 3. Per-worker contexts (uvicorn,
granian) resume only when the kernel happens to pick the issuing worker
(50-73 % measured on this machine); a full handshake costs the server about
twice the CPU of a resumed one. A reload keeps the context, and so the keys,
unless the certificate settings changed.

TLS 1.2 session IDs are the exception: OpenSSL's server session cache is
each process's own memory, so a session ID resumed only on the worker that
made it (13-15 of 20 with 2 workers). The cache is off (zion/tls_native.py):
a client offering a session ID gets a full handshake on every worker, and
resumes with a ticket instead (every TLS 1.2 and 1.3 client sends one unless
told not to).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from zion import tls_native
from zion.errors import TLSConfigError
from zion.log import get_logger
from zion.settings import TLSSettings

logger = get_logger("zion.tls")

SELF_SIGNED_NAME = "selfsigned.pem"
_RENEW_BEFORE = datetime.timedelta(days=7)


def state_dir(settings: TLSSettings) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    if os.geteuid() == 0:
        return Path("/var/lib/zion")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "zion"


def _no_passphrase() -> str:
    raise TLSConfigError("the private key is encrypted; give its password with "
                         "--ssl-keyfile-password (or [tls] keyfile_password)")


def cert_files(settings: TLSSettings) -> tuple[str, str, str]:
    """The certificate and key files (made once when none is given), and
    where they came from; HTTP/3 (zion/quic/tls.py) loads the same ones."""
    if settings.certfile:
        return settings.certfile, settings.keyfile, settings.certfile
    path = ensure_self_signed(state_dir(settings))
    return str(path), str(path), f"self-signed:{path}"


def build_context(settings: TLSSettings) -> tuple[ssl.SSLContext, str]:
    """Return the server context and a description of where the cert came from."""
    certfile, keyfile, source = cert_files(settings)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["h2", "http/1.1"] if settings.http2 else ["http/1.1"])
    if settings.ciphers:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise TLSConfigError(f"tls.ciphers {settings.ciphers!r}: OpenSSL selects no cipher "
                                 "from it") from None
    _native(ctx, settings)
    if settings.cert_reqs != "none":
        try:
            ctx.load_verify_locations(settings.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load tls.ca_certs {settings.ca_certs}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.verify_mode = (ssl.CERT_REQUIRED if settings.cert_reqs == "required"
                           else ssl.CERT_OPTIONAL)
    password = settings.keyfile_password or _no_passphrase
    try:
        ctx.load_cert_chain(certfile, keyfile, password=password)
    except TLSConfigError:
        raise
    except FileNotFoundError as exc:
        missing = exc.filename or (certfile if not os.path.exists(certfile) else keyfile)
        raise TLSConfigError(f"cannot read {missing}: no such file") from None
    except PermissionError as exc:
        raise TLSConfigError(f"cannot read {exc.filename or certfile}: permission denied"
                             ) from None
    except ssl.SSLError as exc:
        what = "certificate and key do not match" if "MISMATCH" in str(exc) else str(exc)
        if settings.keyfile_password and ("bad decrypt" in str(exc) or "BAD_DECRYPT" in str(
                exc) or "PEM lib" in str(exc)):
            what = "the key's password (tls.keyfile_password) is wrong"
        raise TLSConfigError(f"cannot load {certfile} / {keyfile}: {what}") from None
    except OSError as exc:
        raise TLSConfigError(f"cannot load {certfile} / {keyfile}: {exc}") from None
    return ctx, source


def _native(ctx: ssl.SSLContext, settings: TLSSettings) -> None:
    try:
        tls_native.session_id_cache_off(ctx)
    except tls_native.NativeUnavailable as exc:
        logger.warning("tls_session_id_cache_on", reason=str(exc),
                       detail="TLS 1.2 session IDs resume only on the worker that made them; "
                       "tickets resume on every worker")
    if not settings.groups:
        return
    try:
        tls_native.set_groups(ctx, settings.groups)
    except ValueError:
        raise TLSConfigError(f"tls.groups {settings.groups!r}: OpenSSL knows none of these "
                             "groups") from None
    except tls_native.NativeUnavailable as exc:
        logger.warning("tls_groups_default", reason=str(exc),
                       detail="OpenSSL's default groups are offered, X448 and P-521 included")


def ensure_self_signed(directory: Path) -> Path:
    """Make (once) and return a PEM file holding a key and a self-signed cert.

    Key and certificate share one file written by atomic rename, so two
    servers starting at once cannot pair one's key with the other's cert.
    """
    path = directory / SELF_SIGNED_NAME
    if _still_valid(path):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TLSConfigError(f"cannot create state directory {directory}: {exc.strerror}") from None
    pem = _make_self_signed()
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".selfsigned-")
    except OSError as exc:
        raise TLSConfigError(f"cannot write in state directory {directory}: {exc.strerror} "
                             "(set [tls] state_dir, or give a certificate)") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise TLSConfigError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _still_valid(path: Path) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    now = datetime.datetime.now(datetime.UTC)
    return cert.not_valid_after_utc - _RENEW_BEFORE > now


def _make_self_signed() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # ECDSA P-256: the cheapest signature for the full handshakes that remain.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)
