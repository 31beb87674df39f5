"""Streams whose apps do not read must not stall the other streams of their
HTTP/2 connection (zion/http/h2.py, receive flow control), through a real
`zion serve` over TLS, driven by the `h2` library's client."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.connection
from websockets.frames import Frame, Opcode

from tests.conftest import ZionProcess, close, get
from tests.support.h2peer import Client, open_tls, pump

_WS = [(":protocol", "websocket"), ("sec-websocket-version", "13")]
_HELD = 5  # streams whose apps do not read: past the connection window's share


def _message(size: int, fill: bytes = b"m") -> bytes:
    return Frame(Opcode.BINARY, fill * size).serialize(mask=True, extensions=None)


async def _fill(client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                sids: list[int], data: bytes) -> dict[int, int]:
    """Send `data` again and again on each of `sids`, as far as the server's
    windows allow, until every one of those streams' windows (or the
    connection's) is shut and stays so after the server answered a PING.
    Returns the bytes sent on each."""
    c: h2.connection.H2Connection = client.h2
    at = dict.fromkeys(sids, 0)
    total = dict.fromkeys(sids, 0)

    def send_all() -> int:
        sent = 0
        for sid in sids:
            while (room := min(c.local_flow_control_window(sid), c.max_outbound_frame_size)):
                chunk = (data * 2)[at[sid]:at[sid] + room]
                c.send_data(sid, chunk)
                at[sid] = (at[sid] + len(chunk)) % len(data)
                total[sid] += len(chunk)
                sent += len(chunk)
        return sent

    quiet = 0
    for _ in range(500):
        quiet = 0 if send_all() else quiet + 1
        if quiet == 3:  # nothing could go for three round trips
            return total
        c.ping(b"flowctl!")
        await pump(client, reader, writer, lambda n=client.pings_acked: client.pings_acked > n)
    raise AssertionError("the server kept opening the windows of apps that do not read")


async def _upload(client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  sid: int, body: bytes) -> None:
    """Send `body` on `sid` as the windows allow, then wait for the answer."""
    c = client.h2
    sent = 0
    while sent < len(body):
        room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(body) - sent)
        if room:
            c.send_data(sid, body[sent:sent + room], end_stream=sent + room == len(body))
            sent += room
        else:
            await pump(client, reader, writer, lambda: c.local_flow_control_window(sid) > 0)
    await pump(client, reader, writer, lambda: client.responses[sid].ended)


async def test_websockets_whose_apps_do_not_receive_leave_the_others_flowing(
        start_zion: Any) -> None:
    """Issue: one client's WebSockets whose apps do not receive held the
    connection's window between them (5 x 256 KiB > 1 MiB): its other
    WebSocket, an echo, could not send a byte."""
    srv: ZionProcess = start_zion("h2_hold_app:app", "--no-bpf-demux",
                                  "--no-ws-per-message-deflate", workers=1)
    client, reader, writer = await open_tls(srv.port)
    try:
        deaf = [client.request("CONNECT", "/deaf", end=False, headers=_WS)
                for _ in range(_HELD)]
        echo = client.request("CONNECT", "/echo", end=False, headers=_WS)
        rs = client.responses
        await pump(client, reader, writer, lambda: all(rs[s].status for s in [*deaf, echo]))
        assert all(rs[s].status == 200 for s in [*deaf, echo])
        await _fill(client, reader, writer, deaf, _message(16000))
        c = client.h2
        # Each held stream holds its own window; the connection's is still open.
        assert all(c.local_flow_control_window(s) == 0 for s in deaf)
        assert c.outbound_flow_control_window > 0, "the held streams shut the connection"
        # 20 messages at once: they share the connection's decoded budget,
        # which the held apps' queues fill, yet each is echoed.
        for i in range(20):
            c.send_data(echo, _message(1000, bytes([65 + i])))
        last = bytes([65 + 19]) * 1000
        await pump(client, reader, writer, lambda: bytes(rs[echo].body).endswith(last))
        echoed = bytes(rs[echo].body)
        assert all(bytes([65 + i]) * 1000 in echoed for i in range(20))
    finally:
        await close(writer)
        await get(srv.port, "/release")


async def test_request_bodies_apps_do_not_read_leave_the_others_flowing(
        start_zion: Any) -> None:
    """The same with request bodies: five uploads to an app that does not
    read them yet, then more requests on the connection, with bodies."""
    srv: ZionProcess = start_zion("h2_hold_app:app", "--no-bpf-demux", workers=1)
    client, reader, writer = await open_tls(srv.port)
    try:
        held = [client.request("POST", "/hold", end=False) for _ in range(_HELD)]
        sent_held = await _fill(client, reader, writer, held, b"u" * 100_000)
        c = client.h2
        assert all(c.local_flow_control_window(s) == 0 for s in held)
        assert c.outbound_flow_control_window > 0, "the held streams shut the connection"
        rs = client.responses
        for _ in range(3):
            sid = client.request("POST", "/", end=False)
            await _upload(client, reader, writer, sid, b"b" * 300_000)
            assert rs[sid].status == 200 and bytes(rs[sid].body) == b"300000"
        await get(srv.port, "/release")  # the apps read now: their windows open
        for sid in held:
            c.end_stream(sid)
        await pump(client, reader, writer, lambda: all(rs[s].ended for s in held))
        assert [bytes(rs[s].body) for s in held] == [b"%d" % sent_held[s] for s in held]
    finally:
        await close(writer)
