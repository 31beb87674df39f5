"""TLS: the self-signed default, protocol floor, ALPN, key errors, shared tickets."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import (
    APPS,
    REPO,
    Response,
    client_context,
    close,
    connect,
    read_response,
    wait_for,
)
from tests.support.certs import client_ca, encrypted_server_key, rsa_server_cert
from zion.errors import TLSConfigError
from zion.settings import TLSSettings
from zion.tls import build_context, ensure_self_signed


@dataclass
class Handshake:
    """What one closed connection showed: the answer and its TLS facts."""

    data: bytes
    version: str | None
    alpn: str | None
    session: ssl.SSLSession | None
    reused: bool


def handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
              ) -> Handshake:
    """One request on a new TLS connection, read to its end and closed."""
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="localhost", session=session) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return Handshake(data, sock.version(), sock.selected_alpn_protocol(), sock.session,
                         sock.session_reused)


def test_self_signed_made_once_and_verifies(start_zion, state_dir):
    srv = start_zion()
    pem = state_dir / "selfsigned.pem"
    assert pem.exists()
    first = pem.read_bytes()
    ctx = ssl.create_default_context(cafile=str(pem))  # verify for real, incl. hostname
    ctx.set_alpn_protocols(["http/1.1"])
    for host in ("localhost",):
        shake = handshake(srv.port, ctx)
        assert shake.data.startswith(b"HTTP/1.1 200")
        assert shake.alpn == "http/1.1"
        assert shake.version in ("TLSv1.3", "TLSv1.2")
        assert host
    ensure_self_signed(state_dir)
    assert pem.read_bytes() == first  # reused, not regenerated


# The client must offer TLS 1.0/1.1 to show zion refuses them; Python deprecates
# naming those versions, and only that warning is let through.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_refused(start_zion):
    srv = start_zion()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises(ssl.SSLError):
        handshake(srv.port, ctx)
    ok = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ok.check_hostname, ok.verify_mode = False, ssl.CERT_NONE
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    shake = handshake(srv.port, ok)
    assert shake.version == "TLSv1.2" and shake.data.startswith(b"HTTP/1.1 200")


def test_session_tickets_resume_across_workers(start_zion):
    """Workers share ticket keys: resumption works whichever worker answers."""
    srv = start_zion(workers=4)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    session = handshake(srv.port, ctx).session
    resumed, workers = 0, set()
    total = 80
    for _ in range(total):
        shake = handshake(srv.port, ctx, session)
        resumed += shake.reused
        for line in shake.data.split(b"\r\n"):
            if line.startswith(b"x-zion-worker:"):
                workers.add(line.split(b":")[1].strip())
        session = shake.session
    assert len(workers) >= 3, f"connections should spread over workers, saw {workers}"
    assert resumed / total >= 0.95, f"only {resumed}/{total} handshakes resumed"


def _run_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zion", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=30, cwd=APPS,
                          env={**env, "PYTHONPATH": str(REPO)})


def test_mismatched_key_is_one_line_exit_2(tmp_path, zion_env):
    a = ensure_self_signed(tmp_path / "a")
    b = ensure_self_signed(tmp_path / "b")
    result = _run_serve("--ssl-certfile", str(a), "--ssl-keyfile", str(b), env=zion_env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "do not match" in lines[0]


def test_unreadable_cert_is_one_line_exit_2(tmp_path, zion_env):
    result = _run_serve("--ssl-certfile", str(tmp_path / "nope.pem"),
                        "--ssl-keyfile", str(tmp_path / "nope.key"), env=zion_env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0]


def test_build_context_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TLSConfigError):
        build_context(TLSSettings(certfile=str(bad), keyfile=str(bad), state_dir=str(tmp_path)))


@pytest.mark.skipif(shutil.which("capsh") is None,
                    reason="capsh is not installed (Debian package libcap2-bin)")
def test_an_unwritable_state_dir_is_one_line_and_exit_2(start_zion, tmp_path):
    state = tmp_path / "ro-state"
    state.mkdir()
    state.chmod(0o555)
    # root writes anywhere; without CAP_DAC_OVERRIDE it is held to the mode bits
    wrapper = [shutil.which("capsh") or "capsh", "--drop=cap_dac_override,cap_dac_read_search",
               "--", "-c", 'exec "$0" "$@"']
    srv = start_zion(env={"ZION_TLS_STATE_DIR": str(state)}, wrapper=wrapper, ready=False)
    assert srv.proc.wait(20) == 2
    fatal = srv.events("fatal")
    assert len(fatal) == 1 and f"cannot write in state directory {state}" in fatal[0]["error"]
    assert "Traceback" not in srv.log_text()


async def test_client_certificates_required_and_seen_by_the_app(start_zion, tmp_path):
    paths = client_ca(tmp_path)
    srv = start_zion("tls_app:app", "--ssl-ca-certs", str(paths["ca"]),
                     "--ssl-cert-reqs", "required", workers=1)
    ctx = client_context()
    ctx.load_cert_chain(paths["cert"], paths["key"])
    resp = await get_with(srv.port, ctx)
    assert json.loads(resp.body) == {"name": "CN=test client", "chain": 1, "version": 0x0304}
    # the app's own server header wins, and is the only one
    assert resp.headers["server"] == "app/1.0" and resp.raw_head.lower().count(b"server:") == 1
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await get_with(srv.port, client_context())  # no certificate: refused


def test_encrypted_key_with_the_right_and_a_wrong_password(start_zion, tmp_path):
    paths = encrypted_server_key(tmp_path, b"right")
    args = ["--ssl-certfile", str(paths["cert"]), "--ssl-keyfile", str(paths["key"])]
    good = start_zion(*args, "--ssl-keyfile-password", "right", workers=1)
    assert good.port
    bad = start_zion(*args, "--ssl-keyfile-password", "wrong", workers=1, ready=False)
    assert bad.proc.wait(20) == 2
    fatal = bad.events("fatal")
    assert len(fatal) == 1 and "password" in fatal[0]["error"]


async def get_with(port: int, ctx: ssl.SSLContext) -> Response:
    reader, writer = await connect(port, ctx=ctx)
    try:
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        await close(writer)


def _session(port: int, ctx: ssl.SSLContext,
             session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession | None, bool]:
    shake = handshake(port, ctx, session)
    assert shake.data.startswith(b"HTTP/1.1 200")
    return shake.session, shake.reused


def test_ticket_keys_rotate_on_reload_and_after_their_lifetime(start_zion):
    srv = start_zion(env={"ZION_TLS_TICKET_KEY_LIFETIME": "2"}, workers=1)
    ctx = client_context()

    def settled() -> tuple[int, list[int]] | None:
        # No rotation under way and one worker: the keys cannot change
        # under the next handshakes. (On a loaded machine the first rotation
        # can start before the server is even ready.)
        done, pids = len(srv.events("reload_complete")), srv.worker_pids()
        return (done, pids) if done == len(srv.events("ticket_keys_rotating")) \
            and len(pids) == 1 else None

    done, [first] = wait_for(settled, 30, "no rotation under way")
    session, _ = _session(srv.port, ctx)
    assert _session(srv.port, ctx, session)[1], "resumes under the same keys"
    wait_for(lambda: len(srv.events("reload_complete")) > done, 20, "the rotation's reload")
    # Until it has left, the first worker (old keys) may still take a
    # connection from the listener it shares with its replacement.
    wait_for(lambda: first not in srv.worker_pids(), 20, "the first worker to leave")
    after, resumed = _session(srv.port, ctx, session)
    assert not resumed, "a ticket from before the rotation must not resume"
    assert _session(srv.port, ctx, after)[1], "new tickets resume again"


def test_a_sighup_reload_gets_fresh_ticket_keys(start_zion):
    srv = start_zion(workers=1)
    ctx = client_context()
    session, _ = _session(srv.port, ctx)
    srv.signal(signal.SIGHUP)
    wait_for(lambda: srv.events("reload_complete"), 20, "the reload")
    wait_for(lambda: len(srv.worker_pids()) == 1, 20, "the old worker to leave")
    assert not _session(srv.port, ctx, session)[1]


OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def s_client(port: int, *args: str) -> str:
    """One openssl s_client connection that sends a request: its whole output."""
    assert OPENSSL is not None
    out = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-ign_eof", *args],
        input=b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        capture_output=True, timeout=20)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def _handshook(output: str) -> bool:
    return "HTTP/1.1 200" in output


@needs_openssl
def test_tls12_offers_only_mozilla_intermediate_ciphers_and_groups(start_zion, tmp_path):
    """What sslyze's Mozilla "intermediate" check asks: ECDHE with AES-GCM or
    ChaCha20 (no CBC suite, no DHE), and groups X25519, P-256, P-384 only
    (OpenSSL's default list adds X448 and P-521). An RSA certificate, so each
    group can be offered alone in TLS 1.2 too."""
    cert = rsa_server_cert(tmp_path)
    srv = start_zion("--ssl-certfile", str(cert["cert"]), "--ssl-keyfile", str(cert["key"]),
                     workers=1)
    for cipher in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                   "ECDHE-RSA-CHACHA20-POLY1305"):
        assert _handshook(s_client(srv.port, "-tls1_2", "-cipher", cipher)), cipher
    for cipher in ("ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384",
                   "ECDHE-RSA-AES128-SHA", "DHE-RSA-AES128-GCM-SHA256", "AES128-GCM-SHA256"):
        assert not _handshook(s_client(srv.port, "-tls1_2", "-cipher", cipher)), cipher
    for version in ("-tls1_2", "-tls1_3"):
        for group in ("X25519", "P-256", "P-384"):
            assert _handshook(s_client(srv.port, version, "-groups", group)), (version, group)
        for group in ("X448", "P-521"):
            assert not _handshook(s_client(srv.port, version, "-groups", group)), (version,
                                                                                   group)


@needs_openssl
def test_tls12_resumption_is_the_same_on_every_worker(start_zion, tmp_path):
    """Session IDs: OpenSSL's server cache is per process, so an ID resumed
    only on the worker that made it (13-15 of 20 with 2 workers). The cache
    is off: the server sends no session ID (RFC 5246 7.4.1.3: empty = not
    resumable), so no client waits on one and every worker answers alike.
    Tickets, whose keys the workers share, resume on all 20."""
    srv = start_zion(workers=2)
    reused: dict[str, int] = {}
    workers: set[str] = set()
    for kind, extra in (("ids", ["-no_ticket"]), ("tickets", [])):
        sess = tmp_path / f"{kind}.pem"
        first = s_client(srv.port, "-tls1_2", *extra, "-sess_out", str(sess))
        assert _handshook(first), first
        if kind == "ids":
            assert re.search(r"Session-ID: *\n", first), "a session ID was offered"
            assert not sess.exists()
            continue
        reused[kind] = 0
        for _ in range(20):
            out = s_client(srv.port, "-tls1_2", *extra, "-sess_in", str(sess))
            assert _handshook(out), out
            reused[kind] += "\nReused," in out
            workers.update(line.split(":", 1)[1].strip() for line in out.splitlines()
                           if line.lower().startswith("x-zion-worker:"))
    assert len(workers) == 2, workers
    assert reused["tickets"] == 20, f"{reused['tickets']}/20 tickets resumed"
