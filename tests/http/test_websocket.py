"""WebSocket over a fake transport, driven by the `websockets` library's own
sans-I/O client: handshake, messages, fragments, ping/pong, close codes,
denials, limits and back-pressure, without a TLS server."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.support.fake_transport import FakeTransport, connect, make_state, settle, until


class Client:
    """A websockets ClientProtocol wired to a zion connection."""

    def __init__(self, app: Any, subprotocols: list[str] | None = None, deflate: bool = False,
                 **ws_settings: Any) -> None:
        self.state = make_state(websocket=_ws_settings(**ws_settings))
        self.proto = ClientProtocol(
            parse_uri("wss://x/ws"), subprotocols=subprotocols,  # type: ignore[arg-type]
            extensions=[ClientPerMessageDeflateFactory()] if deflate else None,
            max_size=None)
        self.tr: FakeTransport = connect(self.state, app)
        self.response: Response | None = None
        self.frames: list[Frame] = []

    async def open(self) -> Response | None:
        self.proto.send_request(self.proto.connect())
        await self.pump()
        return self.response

    async def pump(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.tr.feed(data)
        await settle(10)
        out = self.tr.take()
        if out:
            self.proto.receive_data(out)
        if self.tr.closed:
            self.proto.receive_eof()
        for event in self.proto.events_received():
            if isinstance(event, Response):
                self.response = event
            else:
                self.frames.append(event)

    async def until(self, predicate: Any) -> None:
        async def step() -> bool:
            await self.pump()
            return bool(predicate())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not await step():
            assert loop.time() < deadline, "timed out"
            await asyncio.sleep(0.001)

    def messages(self) -> list[Any]:
        return [f.data.decode() if f.opcode is Opcode.TEXT else bytes(f.data)
                for f in self.frames if f.opcode in (Opcode.TEXT, Opcode.BINARY)]


def _ws_settings(**overrides: Any) -> dict[str, Any]:
    values = {"max_size": 16 * 1024 * 1024, "ping_interval": 0.0, "ping_timeout": 20.0,
              "per_message_deflate": True, "max_queue": 32}
    values.update(overrides)
    return values


async def echo(scope, receive, send):
    assert scope["type"] == "websocket"
    msg = await receive()
    assert msg == {"type": "websocket.connect"}
    await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0],
                "headers": [(b"x-app", b"yes")]})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            events.append(msg)
            return
        if msg.get("text") == "close-me":
            await send({"type": "websocket.close", "code": 4001, "reason": "asked"})
            continue
        await send({"type": "websocket.send", **{k: v for k, v in msg.items() if k != "type"}})


events: list[dict[str, Any]] = []


async def test_handshake_text_binary_and_subprotocol():
    client = Client(echo, subprotocols=["chat.v2", "chat.v1"])
    resp = await client.open()
    assert resp is not None and resp.status_code == 101
    assert resp.headers["Sec-WebSocket-Protocol"] == "chat.v2"
    assert resp.headers["x-app"] == "yes" and resp.headers["Server"] == "zion"
    client.proto.send_text(b"hello")
    client.proto.send_binary(b"\x00" * 100_000)
    await client.until(lambda: len(client.messages()) == 2)
    assert client.messages() == ["hello", b"\x00" * 100_000]


async def test_fragmented_message_is_delivered_whole():
    client = Client(echo)
    await client.open()
    client.proto.send_text(b"frag", fin=False)
    client.proto.send_continuation(b"men", fin=False)
    client.proto.send_continuation(b"ted", fin=True)
    await client.until(lambda: client.messages())
    assert client.messages() == ["fragmented"]


async def test_ping_is_answered_and_close_codes_go_both_ways():
    events.clear()
    client = Client(echo)
    await client.open()
    client.proto.send_ping(b"abcd")
    await client.until(lambda: any(f.opcode is Opcode.PONG for f in client.frames))
    client.proto.send_text(b"close-me")
    await client.until(lambda: client.proto.close_rcvd is not None)
    assert (client.proto.close_rcvd.code, client.proto.close_rcvd.reason) == (4001, "asked")
    # and from the client: the app sees the client's code
    events.clear()
    client = Client(echo)
    await client.open()
    client.proto.send_close(4321, "bye")
    await client.until(lambda: events)
    assert events[0]["code"] == 4321 and events[0]["reason"] == "bye"
    await client.until(lambda: client.tr.closed)


async def test_permessage_deflate_is_negotiated():
    client = Client(echo, deflate=True)
    resp = await client.open()
    assert "permessage-deflate" in resp.headers.get("Sec-WebSocket-Extensions", "")
    client.proto.send_text(b"z" * 10_000)
    await client.until(lambda: client.messages())
    assert client.messages() == ["z" * 10_000]
    off = Client(echo, deflate=True, per_message_deflate=False)
    resp = await off.open()
    assert "Sec-WebSocket-Extensions" not in resp.headers


async def test_message_over_max_size_closes_1009():
    client = Client(echo, max_size=1000)
    await client.open()
    client.proto.send_binary(b"x" * 2000)
    await client.until(lambda: client.proto.close_rcvd is not None)
    assert client.proto.close_rcvd.code == 1009


async def test_invalid_utf8_closes_1007():
    client = Client(echo)
    await client.open()
    client.proto.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    await client.until(lambda: client.proto.close_rcvd is not None)
    assert client.proto.close_rcvd.code == 1007


async def test_close_before_accept_is_403_and_http_denial_is_sent_as_is():
    async def refuse(scope, receive, send):
        await receive()
        await send({"type": "websocket.close"})

    client = Client(refuse)
    resp = await client.open()
    assert resp.status_code == 403 and client.tr.closed

    async def deny(scope, receive, send):
        await receive()
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"www-authenticate", b"Bearer")]})
        await send({"type": "websocket.http.response.body", "body": b"no", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b" entry"})

    client = Client(deny)
    resp = await client.open()
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.body == b"no entry"


async def test_an_app_that_never_receives_stops_the_socket_being_read():
    accepted = asyncio.Event()

    async def deaf(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await asyncio.Event().wait()

    client = Client(deaf, max_queue=4)
    await client.open()
    for i in range(10):
        client.proto.send_text(b"m%d" % i)
    await client.pump()
    assert client.tr.read_paused


async def test_unanswered_ping_closes_the_connection():
    client = Client(echo, ping_interval=0.01, ping_timeout=0.01)
    await client.open()
    # The client never answers (its frames are not fed back): the server gives up.
    await until(lambda: client.tr.closed, timeout=2)


async def test_send_after_the_client_left_raises_oserror():
    result: dict[str, Any] = {}
    go = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await go.wait()
        try:
            await send({"type": "websocket.send", "text": "late"})
        except OSError as exc:
            result["exc"] = exc

    client = Client(app)
    await client.open()
    client.tr.protocol.connection_lost(None)
    go.set()
    await until(lambda: "exc" in result)
    assert client.proto.state is State.OPEN  # the client never saw a close: it just left


async def test_app_that_raises_after_accept_closes_1011_and_before_accept_500():
    async def crash_after(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    client = Client(crash_after)
    await client.open()
    await client.until(lambda: client.proto.close_rcvd is not None)
    assert client.proto.close_rcvd.code == 1011

    async def crash_before(scope, receive, send):
        raise RuntimeError("boom")

    client = Client(crash_before)
    resp = await client.open()
    assert resp.status_code == 500


async def test_a_client_that_does_not_read_makes_the_apps_send_wait():
    sent: list[int] = []

    async def talker(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        for i in range(5):
            await send({"type": "websocket.send", "bytes": b"x" * 1000})
            sent.append(i)
        await send({"type": "websocket.close"})

    client = Client(talker)
    client.proto.send_request(client.proto.connect())
    for data in client.proto.data_to_send():
        client.tr.feed(data)
    ws = client.tr.protocol
    ws.pause_writing()  # the transport's buffer is over its high-water mark
    await settle(10)
    assert sent == []  # the first message is written, then the app waits
    ws.resume_writing()
    await until(lambda: len(sent) == 5)
