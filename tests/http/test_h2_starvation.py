"""Streams whose apps do not read must not stall the other streams of their
HTTP/2 connection (zion/http/h2.py, receive flow control), through a real
`zion serve` over TLS, driven by the `h2` library's client."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.connection
from websockets.frames import Frame, Opcode

from tests.conftest import ZionProcess, close, get
from tests.http.unread_status import unread_body, unread_body_becomes
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


# A worker-wide budget of unread body small enough to reach with one client:
# 8 streams x 64 KiB against 256 KiB, connection windows of 128 KiB.
_BUDGET, _CONN_WINDOW, _STREAM_WINDOW = 262144, 131072, 65536
_SMALL = {"ZION_LIMITS_UNREAD_BODY_PER_WORKER": str(_BUDGET),
          "ZION_LIMITS_H2_CONNECTION_WINDOW": str(_CONN_WINDOW),
          "ZION_LIMITS_H2_STREAM_WINDOW": str(_STREAM_WINDOW)}


async def test_past_the_workers_unread_budget_the_flooding_client_waits(
        start_zion: Any) -> None:
    """Issue: every connection could make its worker hold h2_max_streams x
    h2_stream_window of body its apps had not read (25 MiB by default), for
    as many clients as came. Past unread_body_per_worker, a client that
    floods streams whose app does not read has its connection window shut
    and kept shut: zion took at most the budget plus one connection window
    from it. Another client, whose app reads, is served meanwhile."""
    srv: ZionProcess = start_zion("h2_hold_app:app", "--no-bpf-demux", workers=1, env=_SMALL)
    client, reader, writer = await open_tls(srv.port)
    try:
        held = [client.request("POST", "/hold", end=False) for _ in range(8)]
        sent = await _fill(client, reader, writer, held, b"u" * 100_000)
        c = client.h2
        assert c.outbound_flow_control_window == 0, "the flood was not stalled"
        # The connection's window stopped it, not the streams' (8 x 64 KiB).
        assert any(c.streams[s].outbound_flow_control_window > 0 for s in held)
        # Credited in full below the budget; past it, one window more at most.
        assert _BUDGET < sum(sent.values()) <= _BUDGET + _CONN_WINDOW
        # The worker counts all of it as held unread (its /_zion/status).
        assert await unread_body(srv.port) == sum(sent.values())
        other, other_reader, other_writer = await open_tls(srv.port)
        try:
            sid = other.request("POST", "/", end=False)
            await _upload(other, other_reader, other_writer, sid, b"b" * 300_000)
            assert other.responses[sid].status == 200
            assert bytes(other.responses[sid].body) == b"300000"
        finally:
            await close(other_writer)
        again = await _fill(client, reader, writer, held, b"u" * 100_000)
        assert sum(again.values()) == 0, "the flooding client was given window again"
    finally:
        await close(writer)
        await get(srv.port, "/release")
    await unread_body_becomes(srv.port, 0)  # read and gone: nothing counted any more


async def test_reset_streams_and_closed_connections_give_their_unread_back(
        start_zion: Any) -> None:
    """What a connection held unread leaves the worker's count when its
    streams are reset or it closes: a second client, stalled only because
    the first one had taken the worker past its budget, gets its window back
    (at the worker's next tick) and fills its streams; then a third, stalled
    behind the second's, once the second closes."""
    srv: ZionProcess = start_zion("h2_hold_app:app", "--no-bpf-demux", workers=1, env=_SMALL)
    first, first_reader, first_writer = await open_tls(srv.port)
    second, second_reader, second_writer = await open_tls(srv.port)
    third, third_reader, third_writer = await open_tls(srv.port)
    try:
        first_held = [first.request("POST", "/hold", end=False) for _ in range(8)]
        await _fill(first, first_reader, first_writer, first_held, b"u" * 100_000)
        assert first.h2.outbound_flow_control_window == 0
        # Past the budget: the second client gets its first window only.
        second_held = [second.request("POST", "/hold", end=False) for _ in range(4)]
        sent = await _fill(second, second_reader, second_writer, second_held, b"v" * 100_000)
        assert second.h2.outbound_flow_control_window == 0
        assert sum(sent.values()) <= _CONN_WINDOW < 4 * _STREAM_WINDOW
        for sid in first_held:
            first.h2.reset_stream(sid)
        first_writer.write(first.h2.data_to_send())
        # Only the second's unread is left, under the budget.
        await pump(second, second_reader, second_writer,
                   lambda: second.h2.outbound_flow_control_window > 0)
        more = await _fill(second, second_reader, second_writer, second_held, b"v" * 100_000)
        assert sum(sent.values()) + sum(more.values()) == 4 * _STREAM_WINDOW
        # The first's resets took its unread out of the worker's count.
        await unread_body_becomes(srv.port, 4 * _STREAM_WINDOW)
        # The second holds the whole budget: the third waits behind it.
        third_held = [third.request("POST", "/hold", end=False) for _ in range(4)]
        sent = await _fill(third, third_reader, third_writer, third_held, b"w" * 100_000)
        assert third.h2.outbound_flow_control_window == 0
        assert sum(sent.values()) <= _CONN_WINDOW
        await close(second_writer)
        await pump(third, third_reader, third_writer,
                   lambda: third.h2.outbound_flow_control_window > 0)
        more = await _fill(third, third_reader, third_writer, third_held, b"w" * 100_000)
        assert sum(sent.values()) + sum(more.values()) == 4 * _STREAM_WINDOW
        assert await unread_body(srv.port) == 4 * _STREAM_WINDOW  # the third's only
    finally:
        for writer in (first_writer, second_writer, third_writer):
            await close(writer)
    # Closed with their apps still not reading: the connections gave it back.
    await unread_body_becomes(srv.port, 0)
    await get(srv.port, "/release")


async def test_a_body_waiting_for_the_window_zion_withholds_is_not_timed_out(
        start_zion: Any) -> None:
    """Issue: past the worker's unread budget, a new upload on the flooding
    client's connection, whose window zion withholds, got 408 after
    body_timeout with no byte of its body sent: the client was not slow,
    zion kept it from sending. Its deadline waits with the window; it is
    answered once the window comes back. A client that has window and stops
    sending, on the same worker at the same time, still gets 408."""
    srv: ZionProcess = start_zion("h2_hold_app:app", "--no-bpf-demux", workers=1,
                                  env={**_SMALL, "ZION_LIMITS_BODY_TIMEOUT": "1"})
    client, reader, writer = await open_tls(srv.port)
    other, other_reader, other_writer = await open_tls(srv.port)
    try:
        held = [client.request("POST", "/hold", end=False) for _ in range(8)]
        await _fill(client, reader, writer, held, b"u" * 100_000)
        c = client.h2
        assert c.outbound_flow_control_window == 0, "the flood was not stalled"
        rs = client.responses
        stalled = client.request("POST", "/", end=False)
        c.ping(b"stalled!")  # its HEADERS reached the worker before the other's
        await pump(client, reader, writer, lambda n=client.pings_acked: client.pings_acked > n)
        # The other connection has window and sends nothing: its deadline
        # comes after the stalled stream's, at the same tick or a later one.
        parked = other.request("POST", "/", body=b"half", end=False)
        await pump(other, other_reader, other_writer,
                   lambda: other.responses[parked].ended)
        assert other.responses[parked].status == 408
        c.ping(b"answers?")  # read what the worker sent the stalled stream by now
        await pump(client, reader, writer, lambda n=client.pings_acked: client.pings_acked > n)
        assert not rs[stalled].ended and rs[stalled].reset is None, rs[stalled].status
        await get(srv.port, "/release")  # the apps read: under the budget, window back
        await _upload(client, reader, writer, stalled, b"b" * 300_000)
        assert rs[stalled].status == 200 and bytes(rs[stalled].body) == b"300000"
    finally:
        await close(other_writer)
        await close(writer)
        await get(srv.port, "/release")
