"""WebSocket over a fake transport, driven by the `websockets` library's own
sans-I/O client: handshake, messages, fragments, ping/pong, close codes,
denials, limits and back-pressure, without a TLS server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
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
              "per_message_deflate": True, "max_queue": 32,
              "max_queue_bytes": 1 << 20}
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


# -- bounds set by the server (issue 19 points 2 and 6) ----------------------------


def _deaf(started: asyncio.Event, go: asyncio.Event, got: list[Any]) -> Any:
    """Accepts, then receives nothing until `go`; then takes everything."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        started.set()
        await go.wait()
        while True:
            msg = await receive()
            got.append(msg)
            if msg["type"] == "websocket.disconnect":
                return

    return app


def _ws(client: Client) -> Any:
    return client.tr.protocol


@pytest.mark.parametrize("bound", ["count", "bytes"])
async def test_a_full_queue_reads_again_only_once_the_app_took_it_down_to_half(bound):
    # Hysteresis: resuming at the first message taken would pause and resume
    # the socket once per message for an app a little slower than its client.
    permits: asyncio.Queue[None] = asyncio.Queue()
    got: list[Any] = []
    started = asyncio.Event()

    async def slow(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        started.set()
        while True:
            await permits.get()
            got.append(await receive())

    limits = {"max_queue": 4} if bound == "count" else {"max_queue_bytes": 4000}
    client = Client(slow, **limits)
    await client.open()
    await started.wait()
    for i in range(10):
        client.proto.send_binary(bytes([i]) * 1000)
    await client.pump()
    ws = _ws(client)
    assert client.tr.read_paused and len(ws.queue) == 4
    permits.put_nowait(None)  # 3 left of 4: not yet
    await client.until(lambda: len(got) == 1)
    await settle(10)
    assert client.tr.read_paused and len(got) + len(ws.queue) == 4  # nothing more decoded
    permits.put_nowait(None)  # 2 left: half-way down, read again
    await client.until(lambda: len(got) + len(ws.queue) > 4)


async def test_the_queue_is_bounded_in_decoded_bytes_and_nothing_decoded_is_dropped():
    # Compressed, each message is about 1 KB on the wire and 1 MiB once
    # inflated: a count of messages bounds nothing, decoded bytes do.
    started, go, got = asyncio.Event(), asyncio.Event(), []
    client = Client(_deaf(started, go, got), deflate=True, max_size=1 << 20,
                    max_queue=1000, max_queue_bytes=100_000)
    await client.open()
    await started.wait()
    for i in range(20):
        client.proto.send_binary(bytes([i]) * (1 << 20))
    await client.pump()
    ws = _ws(client)
    # The first message crossed the line: reading stopped at once, the rest
    # waits undecoded (about 20 KB), not inflated (20 MiB).
    assert client.tr.read_paused
    assert ws.queued_bytes <= 100_000 + (1 << 20)
    assert sum(1 for m in ws.queue if m["type"] == "websocket.receive") == 1
    assert len(ws.pending) - ws.pending_at > 0
    await settle(20)
    assert ws.queued_bytes <= 100_000 + (1 << 20) and client.tr.read_paused
    go.set()
    await client.until(lambda: len(got) == 20)
    assert [m["bytes"] for m in got] == [bytes([i]) * (1 << 20) for i in range(20)]
    assert not client.tr.read_paused and ws.queued_bytes == 0


async def test_inflating_is_bounded_per_loop_turn():
    # A queue big enough for everything: the per-turn budget alone stops
    # decoding; the rest is decoded on later turns, reading paused meanwhile.
    started, go, got = asyncio.Event(), asyncio.Event(), []
    client = Client(_deaf(started, go, got), deflate=True, max_size=1 << 20,
                    max_queue=1000, max_queue_bytes=64 << 20)
    await client.open()
    await started.wait()
    for i in range(8):
        client.proto.send_binary(bytes([i]) * (1 << 20))
    data = b"".join(client.proto.data_to_send())
    ws = _ws(client)
    client.tr.feed(data)  # one read: decoding stops after one 1 MiB message
    assert sum(1 for m in ws.queue if m["type"] == "websocket.receive") == 1
    assert client.tr.read_paused and ws.paused
    await until(lambda: sum(1 for m in ws.queue if m["type"] == "websocket.receive") == 8)
    await settle(3)
    assert not client.tr.read_paused
    go.set()
    await until(lambda: len(got) == 8)


class PausingTransport(FakeTransport):
    """Calls pause_writing() past `high` buffered bytes, as asyncio's do."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = high
        self.write_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.buffer) > self.high and not self.write_paused:
            self.write_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()  # type: ignore[attr-defined]

    def take(self) -> bytes:
        data = super().take()
        if self.write_paused:
            self.write_paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()  # type: ignore[attr-defined]
        return data


def _open_on(transport: FakeTransport, app: Any, **ws_settings: Any) -> tuple[Any, ClientProtocol]:
    """A WebSocket straight on `transport` (no H1 switch), handshake done."""
    from zion.http.websocket import WebSocketProtocol, request_bytes

    state = make_state(websocket=_ws_settings(**ws_settings))
    client = ClientProtocol(parse_uri("wss://x/ws"), max_size=None)  # type: ignore[arg-type]
    request = client.connect()
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.raw_items()]
    ws = WebSocketProtocol(state, app, _http_scope(), request_bytes(b"/ws", headers))
    transport.protocol = ws
    ws.connection_made(transport)
    client.send_request(request)
    client.data_to_send()
    return ws, client


def _http_scope() -> dict[str, Any]:
    return {"asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "scheme": "https", "server": ("127.0.0.1", 8443), "client": ("127.0.0.1", 40000),
            "root_path": "", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
            "headers": [], "state": {}}


async def test_pongs_stop_the_reading_while_the_transport_is_paused():
    started, go, got = asyncio.Event(), asyncio.Event(), []
    tr = PausingTransport(high=4096)
    ws, client = _open_on(tr, _deaf(started, go, got))
    await started.wait()
    client.receive_data(tr.take())
    client.events_received()  # the 101
    for _ in range(20_000):
        client.send_ping(b"")
    flood = b"".join(client.data_to_send())  # 120 KB: 20,000 pings
    tr.feed(flood)
    # Writing paused once 4 KiB of pongs were buffered: no more pings were
    # decoded, so no more pongs; the rest of the flood waits, undecoded.
    assert tr.read_paused and len(tr.buffer) < 4096 + 64
    assert len(ws.pending) - ws.pending_at > len(flood) - 8192
    await settle(10)
    assert len(tr.buffer) < 4096 + 64
    # The client reads: pongs flow again, a bounded batch at a time.
    pongs = 0
    while pongs < 20_000:
        client.receive_data(tr.take())
        pongs += sum(1 for e in client.events_received()
                     if isinstance(e, Frame) and e.opcode is Opcode.PONG)
        assert len(tr.buffer) < 4096 + 64
        await settle(2)
    assert not tr.read_paused


async def test_send_timeout_closes_a_websocket_whose_client_never_reads():
    result: dict[str, Any] = {}

    async def talker(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        try:
            while True:
                await send({"type": "websocket.send", "bytes": b"x" * 1000})
        except OSError as exc:
            result["exc"] = exc

    tr = PausingTransport(high=10_000)
    ws, _client = _open_on(tr, talker)
    await until(lambda: tr.write_paused)
    timeout = ws.state.limits.send_timeout
    ws.check_deadline(ws.loop.time() + timeout / 2)
    assert not tr.closed
    ws.check_deadline(ws.loop.time() + timeout + 1)
    assert tr.aborted
    await until(lambda: "exc" in result)
    assert isinstance(result["exc"], OSError)


async def test_a_protocol_error_after_a_good_message_is_a_disconnect_not_an_app_error():
    from structlog.testing import capture_logs

    result: dict[str, Any] = {}
    go = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        result["first"] = await receive()
        await go.wait()
        await send({"type": "websocket.send", "text": "reply"})  # raises: the client broke it
        result["unreachable"] = True

    with capture_logs() as logs:
        client = Client(app)
        await client.open()
        client.proto.send_text(b"good")
        await client.until(lambda: "first" in result)
        # The app runs before the transport reports the close (over TLS that
        # waits for the TLS shutdown): it sees a connection still open whose
        # client broke the protocol. An unmasked frame from a client: RFC
        # 6455 5.1, the server must close (1002).
        go.set()
        client.tr.feed(b"\x81\x03bad")
        await client.until(lambda: client.proto.close_rcvd is not None)
        await settle(10)
    assert client.proto.close_rcvd.code == 1002
    assert "unreachable" not in result
    assert [e for e in logs if e["log_level"] == "error"] == []
    assert any(e["event"] == "websocket_app_ended_by_disconnect" and e["log_level"] == "debug"
               for e in logs)


def _alive(kind: type) -> int:
    import gc

    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_a_closed_websocket_is_freed_without_the_cyclic_gc():
    import gc
    import weakref

    from zion.http.websocket import WebSocketProtocol

    done = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "text": "ok"})
        done.set()

    gc.collect()
    gc.disable()
    try:
        client = Client(app, deflate=True)
        await client.open()
        client.proto.send_text(b"hello" * 1000)
        await client.until(lambda: client.messages())
        ws = client.tr.protocol
        library = weakref.ref(ws.ws)
        assert _alive(WebSocketProtocol) == 1
        client.tr.close()  # the client leaves: connection_lost
        await done.wait()
        await settle(5)
        client.tr.protocol = None  # as asyncio's transports drop it after connection_lost
        del ws
        # Not collected (the collector is off): freed by reference counts.
        assert (_alive(WebSocketProtocol), library()) == (0, None)
    finally:
        gc.enable()


# -- WebSocket over HTTP/2 (RFC 8441): the version-aware handshake ---------------


class FakeCarrier(FakeTransport):
    """What an HTTP/2 stream hands a WebSocket: respond() for the HEADERS
    (and a refusal's body), write() for DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, list[tuple[bytes, bytes]], bytes, bool]] = []

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                end: bool) -> None:
        self.answers.append((status, headers, body, end))


def _h2_open(app: Any, headers: list[tuple[bytes, bytes]], **ws_settings: Any,
             ) -> tuple[FakeCarrier, Any]:
    from zion.http.websocket import WebSocketProtocol

    state = make_state(websocket=_ws_settings(**ws_settings))
    carrier = FakeCarrier()
    scope = {**_http_scope(), "http_version": "2", "headers": headers}
    ws = WebSocketProtocol(state, app, scope, None)
    carrier.protocol = ws
    ws.connection_made(carrier)
    return carrier, ws


_H2_HEADERS = [(b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat.v2, chat.v1"),
               (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")]


async def test_http2_handshake_answers_200_with_the_negotiated_headers_and_no_key():
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.headers import parse_extension

    events.clear()
    carrier, _ws = _h2_open(echo, _H2_HEADERS)
    await until(lambda: carrier.answers)
    [(status, headers, body, end)] = carrier.answers
    answer = dict(headers)
    assert (status, body, end) == (200, b"", False)
    assert answer[b"sec-websocket-protocol"] == b"chat.v2" and answer[b"x-app"] == b"yes"
    assert answer[b"sec-websocket-extensions"].startswith(b"permessage-deflate")
    assert not {b"sec-websocket-accept", b"upgrade", b"connection"} & set(answer)
    # The stream now carries frames: a client in the open state, with the
    # extension the answer named, talks compressed both ways.
    client = ClientProtocol(parse_uri("wss://x/ws"), state=State.OPEN,  # type: ignore[arg-type]
                            max_size=None)
    [(_name, params)] = parse_extension(answer[b"sec-websocket-extensions"].decode())
    client.extensions = [ClientPerMessageDeflateFactory().process_response_params(params, [])]
    client.send_text(b"z" * 10_000)
    for data in client.data_to_send():
        carrier.feed(data)
    await until(lambda: carrier.buffer)
    client.receive_data(carrier.take())
    [frame] = client.events_received()
    assert frame.data == b"z" * 10_000
    client.send_close(1000)
    for data in client.data_to_send():
        carrier.feed(data)
    await until(lambda: events)
    assert events[0]["code"] == 1000


async def test_http2_handshake_refuses_another_version_and_answers_denials_as_headers():
    called = []

    async def app(scope, receive, send):
        called.append(scope)
        await receive()
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"WWW-Authenticate", b"Bearer"), (b"Connection", b"close")]})
        await send({"type": "websocket.http.response.body", "body": b"no entry"})

    carrier, _ws = _h2_open(app, [(b"sec-websocket-version", b"8")])
    assert carrier.answers[0][0] == 400 and carrier.answers[0][3] is True and carrier.closed
    assert called == []
    carrier, _ws = _h2_open(app, [(b"sec-websocket-version", b"13")])
    await until(lambda: carrier.answers)
    assert carrier.answers == [(401, [(b"www-authenticate", b"Bearer")], b"no entry", True)]
    assert carrier.closed
