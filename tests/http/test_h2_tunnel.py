"""A WebSocket over an HTTP/2 stream (RFC 8441, zion/http/h2_tunnel.py): what
a closed one leaves behind. The h2 client drives zion's H2Protocol over a
fake transport (tests/support/h2peer.py)."""

from __future__ import annotations

import asyncio
import gc
import zlib
from typing import Any

from tests.support.fake_transport import make_state, settle
from tests.support.h2peer import FakePeer

_CONNECTION_OBJECTS = {"zion.http.h2.H2Protocol", "zion.http.h2_stream.H2Stream",
                       "zion.http.h2_tunnel.StreamTransport",
                       "zion.http.websocket.WebSocketProtocol"}


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    from websockets.frames import Frame, Opcode

    return Frame(Opcode(opcode), payload).serialize(mask=True, extensions=None)


async def _left_for_the_collector(ending: str) -> list[str]:
    """Open a WebSocket over HTTP/2 to an app that holds a received message,
    end it (`ending`: "client-left", the connection is lost; "app-closed",
    the app closes, the stream ends and the connection serves on), let the
    app's task end, and return which of zion's objects only the cyclic
    collector would free."""
    ended = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        held = await receive()  # a message the app keeps, like a queue would
        try:
            if ending == "app-closed":
                await send({"type": "websocket.close", "code": 1000})
                while (await receive())["type"] != "websocket.disconnect":
                    pass
            else:
                while True:
                    await asyncio.sleep(0.01)
                    await send({"type": "websocket.send", "text": "tick"})
        except OSError:
            pass
        assert held["bytes"]
        ended.set()

    peer = FakePeer(make_state(websocket={"per_message_deflate": False}), app)
    await peer.run(2)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        sid = peer.client.request("CONNECT", "/ws", end=False, headers=[
            (":protocol", "websocket"), ("sec-websocket-version", "13")])
        await peer.until(lambda: peer.client.responses[sid].status == 200)
        message = _ws_frame(2, b"m" * 100_000)
        assert await peer.push(sid, message) >= len(message)
        if ending == "app-closed":
            # The app's close frame, then ours with END_STREAM.
            await peer.until(lambda: b"\x88" in bytes(peer.client.responses[sid].body))
            peer.client.h2.send_data(sid, _ws_frame(8, b"\x03\xe8"), end_stream=True)
            await peer.until(ended.is_set)
        else:
            await peer.run(3)
            peer.tr.close()  # the client leaves: connection_lost
        await asyncio.wait_for(ended.wait(), 5)
        await settle(5)
        assert not peer.proto.streams and not peer.state.tasks
        if ending == "app-closed":
            assert not peer.tr.closed  # the connection serves on
        else:
            peer.tr.protocol = None  # as asyncio's transports drop it after connection_lost
            del peer
        gc.collect()
        # (The h2 client's and the test state's own objects are cyclic.)
        return sorted({f"{type(o).__module__}.{type(o).__name__}" for o in gc.garbage}
                      & _CONNECTION_OBJECTS)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_a_websocket_whose_client_left_is_freed_without_the_cyclic_gc() -> None:
    """Issue 19.2: a closed connection frees its memory at once. Over HTTP/2
    the WebSocket, its stream and the connection (with the app's queued
    messages) stayed in reference cycles until a full collection: an
    attacker's closed deflate-queue connections piled up (+17 MiB each)."""
    assert await _left_for_the_collector("client-left") == []


async def test_a_websocket_closed_by_the_app_is_freed_while_the_connection_serves_on() -> None:
    assert await _left_for_the_collector("app-closed") == []


def _deflated(payload: bytes) -> bytes:
    """One permessage-deflate message (RFC 7692 7.2.1: raw DEFLATE, the
    final empty block's 00 00 ff ff taken off), masked as a client's."""
    from websockets.frames import Frame, Opcode

    z = zlib.compressobj(wbits=-15)
    data = z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH)
    frame = Frame(Opcode.BINARY, data[:-4]).serialize(mask=True, extensions=None)
    return bytes([frame[0] | 0x40]) + frame[1:]  # RSV1: compressed (RFC 7692 6)


def _decoded(peer: FakePeer) -> int:
    """Decoded bytes the connection's WebSockets hold for their apps."""
    return sum(s.tunnel.protocol.queued_bytes + s.tunnel.protocol.partial_bytes
               for s in peer.proto.streams.values()
               if s.tunnel is not None and s.tunnel.protocol is not None)


async def test_websockets_on_one_connection_share_one_decoded_budget() -> None:
    """Issue 19.2, per connection: each stream's WebSocket is bounded at
    max_queue_bytes + max_size, but one client may open many on a
    connection; 8 deflate bombs to apps not receiving took +142 MiB. The
    decoded total of all of them is bounded at max_queue_bytes + 2 x
    max_size; the others resume, intact, once the apps receive."""
    size, budget, n = 1 << 20, 1 << 16, 8
    go = asyncio.Event()
    got: dict[str, bytes] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await go.wait()  # not receiving (the connect event is taken)
        message = await receive()
        got[scope["path"]] = message["bytes"]

    peer = FakePeer(make_state(websocket={"max_size": size, "max_queue_bytes": budget}), app)
    await peer.run(2)
    sids = [peer.client.request("CONNECT", f"/ws{i}", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13"),
        ("sec-websocket-extensions", "permessage-deflate")]) for i in range(n)]
    await peer.until(lambda: all(peer.client.responses[s].status == 200 for s in sids))
    frames = {sid: _deflated(bytes([65 + i]) * size) for i, sid in enumerate(sids)}
    for sid, frame in frames.items():
        assert len(frame) < 4096  # the bomb: ~1 MiB from a few hundred bytes
        peer.client.h2.send_data(sid, frame)
    most = 0

    def all_in() -> bool:
        nonlocal most
        most = max(most, _decoded(peer))
        return all(peer.proto.streams[s].received == len(f) for s, f in frames.items())

    await peer.until(all_in)
    for _ in range(20):  # decoding goes on in later loop turns (its per-turn budget)
        await peer.run(1)
        most = max(most, _decoded(peer))
    assert size <= most <= budget + 2 * size, most  # without the budget: n x size
    held = [s for s in sids if peer.proto.streams[s].tunnel.read_paused]
    assert len(held) >= n - 2  # their windows stay shut (h2.py _credit)
    go.set()
    await peer.until(lambda: len(got) == n)
    assert got == {f"/ws{i}": bytes([65 + i]) * size for i in range(n)}
    assert peer.proto.ws_budget is not None
    await peer.until(lambda: peer.proto.ws_budget.total == 0)  # type: ignore[union-attr]


async def test_a_fragmented_message_larger_than_the_budget_still_arrives() -> None:
    """The app waits in receive() for a message in pieces bigger than the
    connection's budget: it may decode on (the budget's owner), or it would
    wait for ever."""
    from websockets.frames import Frame, Opcode

    got: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        got.append((await receive())["bytes"])

    peer = FakePeer(make_state(websocket={"per_message_deflate": False,
                                          "max_queue_bytes": 4096}), app)
    await peer.run(2)
    sid = peer.client.request("CONNECT", "/ws", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13")])
    await peer.until(lambda: peer.client.responses[sid].status == 200)
    pieces = [Frame(Opcode.BINARY if i == 0 else Opcode.CONT, bytes([i]) * 5000, fin=i == 3)
              for i in range(4)]
    data = b"".join(f.serialize(mask=True, extensions=None) for f in pieces)
    await peer.upload(sid, data, end=False)
    await peer.until(lambda: bool(got))
    assert got == [b"".join(f.data for f in pieces)]


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the server's WebSocket frames (unmasked) in `data`."""
    frames, at = [], 0
    while len(data) - at >= 2:
        length, head = data[at + 1] & 0x7F, 2
        if length == 126:
            length, head = int.from_bytes(data[at + 2:at + 4], "big"), 4
        elif length == 127:
            length, head = int.from_bytes(data[at + 2:at + 10], "big"), 10
        if len(data) - at < head + length:
            break
        frames.append((data[at] & 0x0F, data[at + head:at + head + length]))
        at += head + length
    return frames


async def _deferred_pong() -> tuple[FakePeer, int, Any, bytes, asyncio.Event]:
    """A WebSocket over HTTP/2 whose app takes nothing until `go` is set:
    reading stopped, and its ping's pong deadline passed (deferred, not a
    1011: websocket.py _pong_overdue). Returns the peer, the stream, the
    WebSocketProtocol, the ping's payload and `go`."""
    go = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await go.wait()
        while (await receive())["type"] != "websocket.disconnect":
            pass

    state = make_state(websocket={"per_message_deflate": False, "max_queue": 2,
                                  "ping_interval": 0.05, "ping_timeout": 0.05})
    peer = FakePeer(state, app)
    await peer.run(2)
    sid = peer.client.request("CONNECT", "/ws", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13")])
    await peer.until(lambda: peer.client.responses[sid].status == 200)
    ws = peer.proto.streams[sid].tunnel.protocol  # type: ignore[union-attr]
    await peer.push(sid, _ws_frame(2, b"m" * 1000) * 20, rounds=5)
    await peer.until(lambda: ws.pong_deferred)
    [ping] = [p for op, p in _server_frames(bytes(peer.client.responses[sid].body)) if op == 9]
    return peer, sid, ws, ping, go


async def test_a_pong_read_once_reading_resumes_ends_the_deferred_wait() -> None:
    """Once reading resumes, the client's pong, read behind the messages
    the app had not taken, answers the ping: the next ping follows, no 1011."""
    peer, sid, ws, ping, go = await _deferred_pong()
    body = peer.client.responses[sid].body
    # The client answers at once: its pong waits behind the messages the app
    # has not taken, undecoded.
    peer.client.h2.send_data(sid, _ws_frame(10, ping))
    await peer.run(2)
    assert ws.pong_deferred and ws.paused
    go.set()  # the app takes its messages: the pong is read with them
    await peer.until(lambda: [op for op, _ in _server_frames(bytes(body))].count(9) == 2)
    assert 8 not in [op for op, _ in _server_frames(bytes(body))]  # no close frame


async def test_a_client_that_never_pongs_is_still_closed_once_reading_resumes() -> None:
    """The deferral is not a way out of keepalive: once zion reads again,
    a client that sends no pong is closed 1011 after ping_timeout."""
    peer, sid, _, _, go = await _deferred_pong()
    body = peer.client.responses[sid].body
    go.set()
    await peer.until(lambda: 8 in [op for op, _ in _server_frames(bytes(body))])
    [close] = [p for op, p in _server_frames(bytes(body)) if op == 8]
    assert int.from_bytes(close[:2], "big") == 1011
