"""zion/quic/endpoint.py on a real server: a worker that replaces a dead one
on its UDP socket answers the dead worker's connections with a stateless
reset (RFC 9000 10.3) carrying the token the client was given, which it can
only derive because every worker shares the master's reset key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import time

import pytest
from aioquic.h3.connection import H3_ALPN
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from tests.conftest import wait_for
from tests.support.bpf import cannot_load_bpf
from tests.support.h3client import h3_connect
from tests.support.serve import serve


async def test_a_dead_workers_connection_gets_a_stateless_reset(start_zion):
    srv = serve(start_zion, "h3_app:app", "--http3", workers=1)
    async with h3_connect(srv.port) as client:
        first = await asyncio.wait_for(client.request("/"), 20)
        assert first.status == 200
        token = client.reset_token
        os.kill(int(first.headers[b"x-pid"]), signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40  # under the per-test timeout
        # The respawn reads the same socket (the master holds it): what was
        # sent meanwhile waits there for it.
        while not any(d.endswith(token) for d in client.datagrams):
            assert loop.time() < deadline, "no stateless reset came back"
            client.send_request("/again")
            await asyncio.sleep(0.2)
    reset = next(d for d in client.datagrams if d.endswith(token))
    assert reset[0] & 0xC0 == 0x40  # looks like a short-header packet
    assert 21 <= len(reset) <= 43


async def test_a_handshake_that_never_finishes_is_dropped(start_zion):
    """One real Initial from a client that then goes silent: the worker
    counts the connection, and forgets it after handshake_timeout (not
    after QUIC's 60 s idle timeout)."""
    srv = serve(start_zion, "h3_app:app", "--http3", workers=1,
                env={"ZION_LIMITS_HANDSHAKE_TIMEOUT": "1"})
    quic = QuicConnection(configuration=_client_config())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _send_initial(quic, sock, srv.port)

        def connections() -> int:
            # The asking HTTP/1.1 connection counts too.
            return int(json.loads(_status(srv.port))["connections"]) - 1

        await asyncio.to_thread(wait_for, lambda: connections() == 1, 20, "the QUIC connection")
        await asyncio.to_thread(wait_for, lambda: connections() == 0, 20,
                                "the silent handshake to be dropped")


async def test_a_drain_refuses_handshakes_at_once(start_zion):
    """A client sent its Initial and went silent; SIGTERM: its handshake
    has no request to finish, so the draining worker closes it at once
    (CONNECTION_CLOSE, CONNECTION_REFUSED) and zion exits, instead of
    holding the drain until handshake_timeout (30 s here)."""
    srv = serve(start_zion, "h3_app:app", "--http3", workers=1,
                env={"ZION_LIMITS_HANDSHAKE_TIMEOUT": "30"})
    quic = QuicConnection(configuration=_client_config())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _send_initial(quic, sock, srv.port)
        await asyncio.to_thread(wait_for, lambda: json.loads(_status(srv.port))["connections"]
                                == 2, 20, "the QUIC connection (and the asking one)")
        srv.signal(signal.SIGTERM)
        # zion's own stop takes ~0.2 s; the handshake held it for 30 s.
        await asyncio.to_thread(wait_for, lambda: srv.proc.poll() is not None, 5,
                                "zion to exit")
        assert srv.proc.returncode == 0
        sock.setblocking(False)
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            quic.receive_datagram(data, addr, now=time.monotonic())
    # The client is told (it can retry elsewhere at once), not left to time
    # out. (A server that saw only its 1,200-octet Initial may send 3,600
    # octets in all; its flight and retransmissions use them up ~3 s after.)
    quic.handle_timer(now=time.monotonic() + 120)  # its draining period, over
    ends = []
    while (event := quic.next_event()) is not None:
        if isinstance(event, events.ConnectionTerminated):
            ends.append(event.error_code)
    assert ends == [QuicErrorCode.CONNECTION_REFUSED]


def _client_config() -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_NONE
    return config


def _send_initial(quic: QuicConnection, sock: socket.socket, port: int) -> None:
    """A client's first flight (its Initial), and nothing after it."""
    quic.connect(("127.0.0.1", port), now=time.monotonic())
    for data, _ in quic.datagrams_to_send(now=time.monotonic()):
        sock.sendto(data, ("127.0.0.1", port))


def _status(port: int) -> bytes:
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_zion/status",
                                context=context, timeout=3) as response:
        return bytes(response.read())


@pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
async def test_a_frozen_worker_gets_no_new_quic_connections(start_zion):
    """SIGSTOP one of two workers: once the status board shows it stalled,
    the program admits every new QUIC connection to the other one (the
    kernel hash would send about half to the frozen worker, where their
    handshakes would hang)."""
    srv = serve(start_zion, "h3_app:app", "--http3", workers=2)
    frozen, alive = srv.wait_event("workers_ready")["pids"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        def stalled() -> bool:
            try:
                board = json.loads(_status(srv.port))["demux"]["workers"]
            except OSError:
                return False  # this request met the frozen worker: ask again
            return any(w["pid"] == frozen and w["state"] == "stalled" for w in board)

        await asyncio.to_thread(wait_for, stalled, 30, "the frozen worker to look stalled")
        pids = []
        for _ in range(4):
            async with h3_connect(srv.port) as client:
                answer = await asyncio.wait_for(client.request("/"), 20)
                pids.append(int(answer.headers[b"x-pid"]))
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert pids == [alive] * 4


async def test_past_many_handshakes_a_new_client_is_retried(start_zion):
    """More Initials that never go on than --limit-h3-retry-above, then a
    real client: it gets a Retry (RFC 9000 8.1.2: prove your address first),
    comes back with the token to the worker the Retry's CID names, and is
    served."""
    retry_above = 4
    srv = serve(start_zion, "h3_app:app", "--http3", "--limit-h3-retry-above",
                str(retry_above), workers=1)
    config = _client_config()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(retry_above + 2):
            _send_initial(QuicConnection(configuration=config), sock, srv.port)
        await asyncio.to_thread(wait_for, lambda: json.loads(_status(srv.port))["connections"]
                                > retry_above, 20, "the silent handshakes")
        async with h3_connect(srv.port) as client:
            answer = await asyncio.wait_for(client.request("/"), 20)
    assert answer.status == 200
    # A long header (0x80) whose type bits say Retry (0x30, QUIC v1).
    assert [d for d in client.datagrams if d[0] & 0xB0 == 0xB0]
