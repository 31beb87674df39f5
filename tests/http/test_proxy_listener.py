"""A real zion with --proxy-protocol: the header is written by the test on a
raw socket before the TLS handshake, as HAProxy's send-proxy(-v2) does."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from tests.conftest import client_context, close, read_response, read_until_closed, wait_for
from tests.support.fake_transport import make_state
from tests.support.h2peer import Client, pump
from tests.support.proxy_headers import ask, inet, inet6, raw_socket, tlv, v1, v2
from zion.http.proxy_listener import ProxyListener
from zion.proxy import V2_SIGNATURE
from zion.tls import ensure_self_signed

APP = "whoami_app:app"


def ask_in_one_write(port: int, header: bytes) -> dict[str, Any]:
    """The header and the ClientHello in one segment, as balancers send them
    when the client's first flight is already there: none of the hello may be
    lost with the header."""
    sock = raw_socket(port)
    sock.settimeout(10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock.sendall(header + outgoing.read())
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "the server closed during the handshake"
            incoming.write(data)
    tls.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    sock.sendall(outgoing.read())
    received = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
        try:
            while chunk := tls.read(65536):
                received += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), received
    return json.loads(body)  # type: ignore[no-any-return]


async def closed_without_answer(sock: socket.socket, tls: bool = True) -> bool:
    """The server closes: the handshake fails, or no byte comes back."""
    try:
        reader, writer = await asyncio.open_connection(
            sock=sock, **({"ssl": client_context(), "server_hostname": "localhost",
                           "ssl_handshake_timeout": 10} if tls else {}))
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    try:
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return await read_until_closed(reader) == b""
    finally:
        await close(writer)


@pytest.fixture
def proxied(start_zion):
    def start(mode: str, *more: str) -> Any:
        # One worker, no demux (nothing here is about steering: no compile).
        return start_zion(APP, "--proxy-protocol", mode, "--workers", "1", "--no-bpf-demux",
                          *more, workers=None)
    return start


async def test_v2_header_before_tls_gives_the_app_the_original_client(proxied):
    srv = proxied("v2")
    assert srv.events("listening")[-1]["proxy_protocol"] == "v2"
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 56324, 443)))
    facts = await ask(sock)
    assert facts["client"] == ["203.0.113.7", 56324]
    assert facts["scheme"] == "https"
    # IPv6 clients, and TLVs (AWS NLB's endpoint id) skipped.
    sock = raw_socket(srv.port)
    sock.sendall(v2(family=0x21, addresses=inet6("2001:db8::7", "2001:db8::1", 4711, 443),
                    tlvs=tlv(0xEA, b"\x01vpce-0123") + tlv(0x04, b"")))
    assert (await ask(sock))["client"] == ["2001:db8::7", 4711]


async def test_header_and_client_hello_in_one_write_or_split(proxied):
    srv = proxied("v2")
    header = v2(addresses=inet("198.51.100.9", "192.0.2.1", 1234, 443))
    loop = asyncio.get_running_loop()
    facts = await loop.run_in_executor(None, ask_in_one_write, srv.port, header)
    assert facts["client"] == ["198.51.100.9", 1234]
    # Split: the header in pieces, then the handshake in its own writes.
    sock = raw_socket(srv.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in (header[:5], header[5:14], header[14:]):
        sock.sendall(piece)
    assert (await ask(sock))["client"] == ["198.51.100.9", 1234]


async def test_v1_header(proxied):
    srv = proxied("v1")
    sock = raw_socket(srv.port)
    sock.sendall(v1("203.0.113.8", 40000))
    assert (await ask(sock))["client"] == ["203.0.113.8", 40000]
    loop = asyncio.get_running_loop()
    facts = await loop.run_in_executor(None, ask_in_one_write, srv.port,
                                       v1("2001:db8::8", 40001, "TCP6", "2001:db8::1"))
    assert facts["client"] == ["2001:db8::8", 40001]
    # A v2 header on a v1 listener is refused.
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
    assert await closed_without_answer(sock)
    wait_for(lambda: srv.events("proxy_header_rejected"), 10, "the rejection logged")


async def test_auto_takes_either_version(proxied):
    srv = proxied("auto")
    sock = raw_socket(srv.port)
    sock.sendall(v1("203.0.113.8", 40000))
    assert (await ask(sock))["client"] == ["203.0.113.8", 40000]
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.9", "192.0.2.1", 40002, 443)))
    assert (await ask(sock))["client"] == ["203.0.113.9", 40002]


async def test_local_and_unknown_keep_the_real_peer(proxied):
    srv = proxied("auto")
    sock = raw_socket(srv.port)
    sock.sendall(v2(command=0x0, family=0x00))  # HAProxy's check-send-proxy health check
    local_port = sock.getsockname()[1]
    assert (await ask(sock))["client"] == ["127.0.0.1", local_port]
    sock = raw_socket(srv.port)
    sock.sendall(b"PROXY UNKNOWN\r\n")
    local_port = sock.getsockname()[1]
    assert (await ask(sock))["client"] == ["127.0.0.1", local_port]


async def test_untrusted_peer_is_closed(proxied):
    srv = proxied("v2", "--proxy-allow-ips", "127.0.0.1")
    sock = raw_socket(srv.port, source="127.0.0.2")
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
    assert await closed_without_answer(sock)
    line = wait_for(lambda: srv.events("proxy_header_rejected"), 10, "the rejection logged")[-1]
    assert line["peer"] == "127.0.0.2" and "proxy_allow_ips" in line["reason"]
    # The trusted balancer still gets through, on the same worker.
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
    assert (await ask(sock))["client"] == ["203.0.113.7", 1]


async def test_no_header_is_closed_and_the_worker_serves_the_next(proxied):
    srv = proxied("v2", "--proxy-allow-ips", "127.0.0.0/8")
    # A plain TLS client (no header): its ClientHello is not a header.
    assert await closed_without_answer(raw_socket(srv.port))
    # Garbage, a truncated header then EOF, a header claiming 64 KiB.
    for junk in (b"GET / HTTP/1.1\r\n\r\n", v2(addresses=inet("1.2.3.4", "5.6.7.8", 1, 2))[:20],
                 b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"):
        sock = raw_socket(srv.port)
        sock.sendall(junk)
        with contextlib.suppress(OSError):  # the server may have reset it already
            sock.shutdown(socket.SHUT_WR)
        assert await closed_without_answer(sock, tls=False)
    sock = raw_socket(srv.port, source="127.0.0.3")
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 2, 443)))
    assert (await ask(sock))["client"] == ["203.0.113.7", 2]
    assert len(srv.worker_pids()) == 1 and not srv.events("worker_exited")


def test_a_bare_connect_and_close_is_not_an_info_line(proxied):
    """TCP health checks (AWS NLB's, HAProxy's plain check) connect and close
    every few seconds: debug, not info; a started header that stops is info."""
    srv = proxied("v2", "--log-level", "debug")
    raw_socket(srv.port).close()
    sock = raw_socket(srv.port)
    sock.sendall(V2_SIGNATURE[:5])
    sock.close()
    lines = wait_for(lambda: len(srv.events("proxy_header_rejected")) == 2
                     and srv.events("proxy_header_rejected"), 10, "two rejections")
    assert sorted(line["level"] for line in lines) == ["debug", "info"]


async def test_a_silent_peer_is_closed_after_the_header_timeout(start_zion):
    srv = start_zion(APP, "--proxy-protocol", "v2", "--no-bpf-demux",
                     env={"ZION_LIMITS_HANDSHAKE_TIMEOUT": "0.5"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(sock=raw_socket(srv.port))
    assert await read_until_closed(reader) == b""  # we never write a byte
    await close(writer)
    assert loop.time() - started < 5
    line = wait_for(lambda: srv.events("proxy_header_rejected"), 10, "the rejection logged")[-1]
    assert "within 0.5 s" in line["reason"]


async def test_http2_over_a_proxied_connection(proxied):
    srv = proxied("v2", "--http2")
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.10", "192.0.2.1", 5555, 443)))
    ctx = client_context(alpn=False)
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx,
                                                   server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    client = Client()
    sid = client.request(path="/")
    await pump(client, reader, writer, lambda: client.responses[sid].ended)
    await close(writer)
    facts = json.loads(bytes(client.responses[sid].body))
    assert facts["client"] == ["203.0.113.10", 5555] and facts["http_version"] == "2"


async def test_builtins_refuse_proxied_connections_even_from_loopback(proxied):
    srv = proxied("v2")
    for header in (v2(addresses=inet("127.0.0.1", "127.0.0.1", 1, 443)),
                   v2(command=0x0, family=0x00)):
        sock = raw_socket(srv.port)
        sock.sendall(header)
        resp = await ask(sock, "/_zion/status")
        assert resp.status == 403


async def _forwarded_behind_header(srv: Any) -> dict[str, Any]:
    """A PROXY header naming 203.0.113.7, then a request whose client wrote
    its own X-Forwarded-For and X-Forwarded-Proto."""
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
    reader, writer = await asyncio.open_connection(sock=sock, ssl=client_context(),
                                                   server_hostname="localhost")
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 198.51.100.1\r\n"
                 b"forwarded: for=198.51.100.2\r\n"
                 b"x-forwarded-proto: http\r\nconnection: close\r\n\r\n")
    facts: dict[str, Any] = (await read_response(reader)).json()
    await close(writer)
    return facts


async def test_forwarded_headers_behind_a_proxy_header_are_the_clients_own(proxied):
    """A TCP-mode balancer (the one that writes PROXY headers) passes the
    request through: an X-Forwarded-For/Forwarded in it came from the client.
    The PROXY header's address wins, though the balancer (127.0.0.1) is in
    forwarded_allow_ips."""
    srv = proxied("v2", "--forwarded-allow-ips", "127.0.0.1")
    facts = await _forwarded_behind_header(srv)
    assert facts["client"] == ["203.0.113.7", 1] and facts["scheme"] == "https"


async def test_forwarded_headers_behind_a_proxy_header_when_the_operator_trusts_them(proxied):
    """--proxy-protocol-trust-forwarded: the balancer adds them itself (an
    HTTP-mode balancer that also sends PROXY), and trusted as from its TCP
    address, not the address the header claims."""
    srv = proxied("v2", "--forwarded-allow-ips", "127.0.0.1", "--proxy-protocol-trust-forwarded")
    facts = await _forwarded_behind_header(srv)
    assert facts["client"][0] == "198.51.100.2" and facts["scheme"] == "http"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_haproxy_protocol(proxied):
    srv = proxied("v1")
    out = subprocess.run(["curl", "-sk", "--haproxy-protocol", "--max-time", "10",
                          f"https://127.0.0.1:{srv.port}/"], capture_output=True, timeout=30)
    assert json.loads(out.stdout)["client"][0] == "127.0.0.1", out


async def test_drain_waits_for_a_connection_still_in_its_handshake(proxied):
    """Accepted, header read, TLS not done when SIGTERM comes: it is a client
    already taken from the queue, so the draining worker still serves it."""
    srv = proxied("v2", "--log-level", "debug")
    early = raw_socket(srv.port)
    early.sendall(v2(addresses=inet("203.0.113.11", "192.0.2.1", 1, 443)))
    # A later connection answered means the earlier one was accepted (FIFO).
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.12", "192.0.2.1", 2, 443)))
    assert (await ask(sock))["client"] == ["203.0.113.12", 2]
    srv.signal(signal.SIGTERM)
    line = await asyncio.to_thread(srv.wait_event, "worker_draining", 20)
    assert line["not_yet_http"] == 1
    assert (await ask(early))["client"] == ["203.0.113.11", 1]
    assert srv.proc.wait(30) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _haproxy_says(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(5)
        admin.connect(str(sock_path))
        admin.sendall(command.encode() + b"\n")
        out = b""
        while chunk := admin.recv(65536):
            out += chunk
    return out.decode()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (Debian package)")
async def test_haproxy_send_proxy_v2_in_front(proxied, tmp_path):
    """The real HAProxy in TCP mode, TLS passed through: zion trusts only
    HAProxy's own address, and the app sees each client's address and port.
    HAProxy's health checks come as v2 LOCAL headers: accepted, the server
    is UP, and no rejection is logged."""
    srv = proxied("v2", "--proxy-allow-ips", "127.0.0.1", "--log-level", "debug")
    port = _free_port()
    config = tmp_path / "haproxy.cfg"
    stats = tmp_path / "haproxy.sock"
    config.write_text(f"""\
global
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend proxy_fe
    bind 127.0.0.1:{port}
    default_backend proxy_be
backend proxy_be
    source 127.0.0.1
    server zion 127.0.0.1:{srv.port} send-proxy-v2 check inter 100ms rise 2
""")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            if haproxy.poll() is not None:
                raise AssertionError(haproxy.stdout.read().decode() if haproxy.stdout else "")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 10, "haproxy listening")
        for source in ("127.0.0.5", "127.0.0.6"):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            mine = sock.getsockname()
            assert (await ask(sock))["client"] == [mine[0], mine[1]]
        # The client is not loopback-direct any more: the built-ins say so.
        sock = socket.create_connection(("127.0.0.1", port))
        assert (await ask(sock, "/_zion/healthz")).status == 403
        wait_for(lambda: "proxy_be,zion," in (row := _haproxy_says(stats, "show stat"))
                 and ",UP," in row.split("proxy_be,zion,")[1].split("\n")[0], 10,
                 "HAProxy's checks to pass")
        # A check connects, sends its LOCAL header and resets: no client named.
        wait_for(lambda: len([e for e in srv.events("handshake_failed")
                              if e["client"] is None]) >= 3, 10, "three LOCAL checks")
        assert not srv.events("proxy_header_rejected")
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        if haproxy.stdout is not None:
            haproxy.stdout.close()


def test_connections_before_http_are_load_for_the_demux(tmp_path):
    """In-process, real sockets: from accept until HTTP has it (header, then
    TLS handshake) a connection counts in the slot's conns, as a handshake
    does on the path without PROXY protocol; every accept is counted once.
    On uvloop, as in a worker: it frees a protocol whose handshake failed at
    once, which is how that handshake's load ends."""
    uvloop.run(_load_accounting(tmp_path))


async def _load_accounting(tmp_path: Path) -> None:
    state = make_state()
    slot = state.slot = SimpleNamespace(conns=0, inflight=0, accepted=0)  # type: ignore[assignment]
    state.dispatch = lambda ex: ex.respond(200, b"ok\n")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ensure_self_signed(tmp_path))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    listener = ProxyListener(state, lsock, server_ctx, v1=False, v2=True, allow="127.0.0.1",
                             handshake_timeout=5, shutdown_timeout=1)
    listener.start()
    loop = asyncio.get_running_loop()

    async def until(what: Any) -> None:
        deadline = loop.time() + 10
        while not what():
            assert loop.time() < deadline, "timed out"
            await asyncio.sleep(0.005)

    try:
        # No header yet: accepted, and load.
        sock = raw_socket(port)
        await until(lambda: slot.accepted == 1 and slot.conns == 1)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not a header: closed, load no more
        await until(lambda: slot.conns == 0)
        sock.close()
        # A header, then something that is not a ClientHello: the failed
        # handshake ends its load too.
        sock = raw_socket(port)
        sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
        await until(lambda: slot.accepted == 2 and slot.conns == 1)
        sock.sendall(b"\x00" * 64)
        await until(lambda: slot.conns == 0 and not listener.pending)
        sock.close()
        # A good one: load through its handshake, then an open connection.
        sock = raw_socket(port)
        sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=client_context(),
                                                       server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
        assert (slot.accepted, slot.conns, state.handshaking) == (3, 1, 0)
        await close(writer)
        await until(lambda: slot.conns == 0)
        # An untrusted peer is accepted (and counted so) but never load.
        sock = raw_socket(port, source="127.0.0.2")
        await until(lambda: slot.accepted == 4)
        assert slot.conns == 0 and state.handshaking == 0
        sock.close()
    finally:
        listener.close()
        lsock.close()


def test_accept_out_of_file_descriptors_pauses_then_goes_on():
    """EMFILE from accept(2) leaves the connection queued: the listener
    stops for a moment instead of spinning on a readable socket, then takes
    it once descriptors are back."""
    uvloop.run(_emfile())


class _Exhausted(socket.socket):
    failing = True

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def _emfile() -> None:
    state = make_state()
    state.slot = SimpleNamespace(conns=0, inflight=0, accepted=0)  # type: ignore[assignment]
    lsock = _Exhausted()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    listener = ProxyListener(state, lsock, None, v1=False, v2=True, allow="127.0.0.1",
                             handshake_timeout=5, shutdown_timeout=1)
    listener.start()
    loop = asyncio.get_running_loop()

    async def until(what: Any) -> None:
        deadline = loop.time() + 10
        while not what():
            assert loop.time() < deadline, "timed out"
            await asyncio.sleep(0.002)

    try:
        sock = raw_socket(lsock.getsockname()[1])
        await until(lambda: not listener.accepting)
        lsock.failing = False
        await until(lambda: state.slot.accepted == 1)
        sock.close()
    finally:
        listener.close()
        lsock.close()
