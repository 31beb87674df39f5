"""WebSocket through a real `zion serve`: TLS, the transport switch, the
demux's connection count, and drain (SIGTERM -> the drain timeout -> 1001)."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import websockets

from tests.conftest import client_context, get, wait_for


async def test_wss_echo_counts_as_a_connection_and_drain_closes_with_1001(start_zion):
    srv = start_zion("ws_raw_app:app", env={"ZION_SUPERVISOR_DRAIN_TIMEOUT": "1"}, workers=1)
    url = f"wss://127.0.0.1:{srv.port}/ws"
    async with websockets.connect(url, ssl=client_context(alpn=False),
                                  server_hostname="localhost") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x01" * 1_000_000)
        assert await ws.recv() == b"\x01" * 1_000_000
        status = (await get(srv.port, "/_zion/status")).json()
        # the status request's own connection plus the open WebSocket
        assert status["connections"] == 2
        srv.signal(signal.SIGTERM)
        try:
            await ws.recv()
            raise AssertionError("the server must close the WebSocket")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert srv.proc.wait(15) == 0
    wait_for(lambda: "ws_app_disconnect code=1001" in srv.log_text(), what="app saw 1001")


# -- bounds set by the server, against real attacks (issue 19 points 2 and 6) ----

_MAX_SIZE = 4 << 20  # --ws-max-size for these tests: each message is 4 MiB inflated
_QUEUE_BYTES = 1 << 20  # [websocket] max_queue_bytes (the default)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _deaf_server(start_zion: Any, *args: str, env: dict[str, str] | None = None) -> Any:
    # No demux: one worker, and the program's compile is not what is tested.
    return start_zion("ws_deaf_app:app", "--no-bpf-demux", "--ws-max-size", str(_MAX_SIZE),
                      *args, env=env, workers=1)


async def _deflate_attack(port: int, messages: int = 40) -> Any:
    """The deflate attack: `messages` messages of about 4 KB compressed, 4 MiB
    inflated, to an app that never receives. Returns the open connection."""
    ws = await websockets.connect(f"wss://127.0.0.1:{port}/ws", ssl=client_context(alpn=False),
                                  server_hostname="localhost", compression="deflate",
                                  max_size=None, ping_interval=None)
    payload = b"\0" * (_MAX_SIZE - 1024)
    for _ in range(messages):
        try:
            # Once the server stops reading, the sockets' buffers fill and a
            # send waits: that is the server's defence working, not an error.
            await asyncio.wait_for(ws.send(payload), 5)
        except TimeoutError:
            break
    return ws


async def _round_trips(port: int, count: int = 5) -> None:
    """HTTP requests answered by the (single) worker: each needs turns of its
    loop after the attack's bytes arrived, so what it decodes is decoded."""
    for _ in range(count):
        assert (await get(port, "/alive")).status == 200


async def test_deflate_attack_on_an_app_that_never_receives_is_bounded_in_bytes(start_zion):
    srv = _deaf_server(start_zion)
    [worker] = srv.worker_pids()
    await _round_trips(srv.port)
    before = _rss_mib(worker)
    attacks = [await _deflate_attack(srv.port) for _ in range(2)]
    await _round_trips(srv.port)
    grown = _rss_mib(worker) - before
    # Per connection: max_queue_bytes + the message that crossed it
    # (max_size) + a transient copy; 16 MiB for the rest (TLS, allocator).
    bound = 2 * (_QUEUE_BYTES + 2 * _MAX_SIZE) / (1 << 20) + 16
    assert grown < bound, f"worker grew {grown:.0f} MiB (bound {bound:.0f}) for 2 connections"
    for ws in attacks:
        ws.transport.abort()


async def test_a_closed_attack_connection_is_freed_with_the_cyclic_gc_off(start_zion):
    srv = _deaf_server(start_zion)
    assert (await get(srv.port, "/gc?off")).body == b"gc_enabled=False"
    for _ in range(3):
        ws = await _deflate_attack(srv.port, messages=4)
        ws.transport.abort()  # the client vanishes; the app's next tick fails and it ends

    async def freed() -> bool:
        alive = (await get(srv.port, "/alive")).body.decode()
        return alive == "WebSocketProtocol=0 _ServerProtocol=0 ServerProtocol=0"

    deadline = asyncio.get_running_loop().time() + 10
    while not await freed():
        assert asyncio.get_running_loop().time() < deadline, (
            "closed WebSockets still in memory: " + (await get(srv.port, "/alive")).body.decode())
    await get(srv.port, "/gc?on")


def _raw_upgrade(port: int, path: str, rcvbuf: int = 0) -> ssl.SSLSocket:
    """A TLS connection that sent a WebSocket upgrade and read the 101."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    tls = client_context(alpn=False).wrap_socket(sock, server_hostname="localhost")
    tls.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n"
                "connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "sec-websocket-version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return tls


def _send_until_blocked(tls: ssl.SSLSocket, data: bytes | memoryview, idle: float = 2.0,
                        chunk: int = 65536) -> int:
    """Send until done or the peer stops taking bytes for `idle` s; bytes sent."""
    tls.settimeout(idle)
    sent = 0
    try:
        while sent < len(data):
            sent += tls.send(data[sent:sent + chunk])
    except (TimeoutError, ssl.SSLWantWriteError):
        pass
    return sent


def _unread(server_port: int, client_port: int) -> int:
    """Bytes the kernel holds for the server that the server has not read:
    rx_queue of its end of the connection (/proc/net/tcp, hex)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no socket {server_port} -> {client_port}")


async def _stopped_reading(port: int, client_port: int) -> bool:
    """The worker leaves the connection's bytes unread: the same non-zero
    count before and after three requests it answered (turns of its loop, in
    which a connection still read would have been)."""
    unread = _unread(port, client_port)
    await _round_trips(port, 3)
    return unread > 0 and _unread(port, client_port) == unread


async def test_a_ping_flood_from_a_client_that_never_reads_is_bounded(start_zion):
    srv = _deaf_server(start_zion)
    [worker] = srv.worker_pids()
    await _round_trips(srv.port)
    before = _rss_mib(worker)
    tls = _raw_upgrade(srv.port, "/ws", rcvbuf=4096)
    client_port = tls.getsockname()[1]
    # Masked pings with 125 bytes of payload (RFC 6455 5.2, 5.5: the most a
    # control frame carries), each owed a pong of 127 bytes. The kernel may
    # hold the pongs of up to tcp_wmem's maximum in the worker's socket (and
    # queue the flood itself in both sockets' autotuned buffers): 16 MiB past
    # that, a worker that kept reading would hold 16 MiB of pongs itself.
    ping = b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    flood = memoryview(ping * ((wmem_max + (16 << 20)) // len(ping)))
    sent = 0
    while True:
        sent += await asyncio.to_thread(_send_until_blocked, tls, flood[sent:], 1.0)
        if await _stopped_reading(srv.port, client_port) or sent == len(flood):
            break
    # The worker stopped reading once its writes were paused: the pongs it
    # owes wait as pings not decoded yet, in the kernel's socket buffer, not
    # as replies queued for a client that reads nothing.
    assert await _stopped_reading(srv.port, client_port), (
        f"the worker read the whole flood ({sent} bytes) and kept reading")
    # Its transport holds write_buffer_high and one pong.
    high = 262144  # [limits] write_buffer_high
    [buffered] = map(int, (await get(srv.port, "/buffers")).body.split())
    assert buffered <= high + 1024, f"{buffered} bytes of pongs queued"
    grown = _rss_mib(worker) - before
    assert grown < 16, f"worker grew {grown:.0f} MiB under a ping flood of {sent} bytes"
    tls.close()


async def test_send_timeout_ends_a_websocket_whose_client_never_reads(start_zion):
    srv = _deaf_server(start_zion, env={"ZION_LIMITS_SEND_TIMEOUT": "1"})
    tls = _raw_upgrade(srv.port, "/flood", rcvbuf=4096)
    # The app sends 64 KB messages; the client reads none: after send_timeout
    # the connection is aborted and the app's send() raises an OSError.
    wait_for(lambda: "ws_send_failed ClientDisconnected" in srv.log_text(),
             what="the app's send() failing after send_timeout")
    status = (await get(srv.port, "/_zion/status")).json()
    assert status["connections"] == 1  # the status request's own
    tls.close()


async def test_a_client_breaking_the_protocol_after_a_good_message_is_a_disconnect(start_zion):
    srv = start_zion("ws_raw_app:app", "--no-bpf-demux", "--log-level", "debug", workers=1)
    tls = _raw_upgrade(srv.port, "/ws")
    # One write, so the worker decodes both before the echo app runs: a good
    # masked text frame, then an unmasked one (RFC 6455 5.1: close 1002).
    good = b"\x81\x84\x00\x00\x00\x00good"
    tls.sendall(good + b"\x81\x03bad")
    received = b""
    while b"\x88" not in received:  # the server's close frame
        chunk = tls.recv(4096)
        assert chunk, "closed without a close frame"
        received += chunk
    close = received[received.index(b"\x88"):]
    assert int.from_bytes(close[2:4], "big") == 1002
    ended = wait_for(lambda: srv.events("app_error") +
                     srv.events("websocket_app_ended_by_disconnect"), what="the app's end")
    assert [(e["event"], e["level"], e.get("code")) for e in ended] == [
        ("websocket_app_ended_by_disconnect", "debug", 1002)]
    tls.close()


async def test_a_pong_behind_messages_the_app_has_not_taken_is_not_a_timeout(start_zion):
    """The app takes no message for a while; zion stops reading the socket
    (back-pressure), so the client's pong waits there, unread, behind the
    messages it sent before. zion closed the WebSocket with 1011 "keepalive
    ping timeout" although the client was not late, zion was. The pong's
    deadline now waits until zion reads again."""
    srv = start_zion("h2_hold_app:app", "--no-bpf-demux", "--no-ws-per-message-deflate",
                     "--ws-ping-interval", "0.2", "--ws-ping-timeout", "0.2", workers=1)
    url = f"wss://127.0.0.1:{srv.port}/late"
    async with websockets.connect(url, ssl=client_context(alpn=False), ping_interval=None,
                                  server_hostname="localhost") as ws:
        count = 200

        async def flood() -> None:
            for _ in range(count):
                await ws.send(b"m" * 65536)

        flooding = asyncio.create_task(flood())
        deadline = asyncio.get_running_loop().time() + 10
        while not srv.events("websocket_pong_wait_deferred"):
            assert asyncio.get_running_loop().time() < deadline, "no pong deadline passed"
            assert not srv.events("websocket_ping_timeout"), "closed with 1011"
            await asyncio.sleep(0.02)
        await get(srv.port, "/release")  # the app takes the messages: zion reads again
        await flooding
        await ws.send("done")
        assert await ws.recv() == str(count)
    assert not srv.events("websocket_ping_timeout")
