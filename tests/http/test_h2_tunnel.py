"""A WebSocket over an HTTP/2 stream (RFC 8441, zion/http/h2_tunnel.py): what
a closed one leaves behind. The h2 client drives zion's H2Protocol over a
fake transport (tests/support/h2peer.py)."""

from __future__ import annotations

import asyncio
import gc
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
