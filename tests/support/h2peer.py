"""An HTTP/2 client for tests: the pure-Python `h2` library (a different
implementation from the server's zttp) driving zion's H2Protocol, either over
a FakeTransport in-process or over a real TLS socket."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame

from tests.support.fake_transport import FakeTransport, settle
from zion.http.state import ServerState


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.ended = False
        self.reset: int | None = None
        self.informational: list[int] = []

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class Client:
    """The h2 client state machine plus what it has seen, per stream."""

    def __init__(self, window: int = 65535) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict[int, int] = {}
        self.auto_ack = True  # give the window back as body bytes arrive
        self.pings_acked = 0

    def request(self, method: str = "GET", path: str = "/", headers: list[tuple[str, str]] = (),
                body: bytes | None = None, end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.h2.send_headers(sid, [(":method", method), (":path", path), (":scheme", "https"),
                                   (":authority", "localhost"), *headers],
                             end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        return sid

    def receive(self, data: bytes) -> list[Any]:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            if self.goaway is None:
                raise
            return []  # h2 takes GOAWAY as the end; the server may still answer
        for ev in events:
            r = self.responses.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = list(ev.headers)
                r.status = int(dict(r.headers)[b":status"])
            elif isinstance(ev, h2.events.InformationalResponseReceived) and r is not None:
                r.informational.append(int(dict(ev.headers)[b":status"]))
            elif isinstance(ev, h2.events.DataReceived) and r is not None:
                r.body += ev.data
                if self.auto_ack and ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.PingAckReceived):
                self.pings_acked += 1
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                changed = ev.changed_settings.items()
                self.remote_settings.update({k: v.new_value for k, v in changed})
        return events


class FakePeer:
    """zion's H2Protocol over a FakeTransport, answered by `app`."""

    def __init__(self, state: ServerState, app: Any = None, window: int = 65535) -> None:
        from zion.http.h2 import H2Protocol

        if app is not None:
            from zion.http.websocket import WebSocketProtocol, request_bytes

            state.dispatch = lambda ex: ex.run(app, state.tasks)

            def ws_factory(scope: dict[str, Any], target: bytes,
                           headers: list[tuple[bytes, bytes]], trailing: bytes | None) -> Any:
                raw = None if trailing is None else request_bytes(target, headers) + trailing
                return WebSocketProtocol(state, app, scope, raw)

            state.websocket_factory = ws_factory
        self.state = state
        self.proto = H2Protocol(state)
        self.tr = FakeTransport(self.proto)
        self.proto.connection_made(self.tr)  # type: ignore[arg-type]
        self.client = Client(window)
        self.exchange()

    def exchange(self) -> None:
        """Client bytes to the server, server bytes to the client, once each."""
        out = self.client.h2.data_to_send()
        if out and not self.tr.closed:
            self.tr.feed(out)
        data = self.tr.take()
        if data:
            self.client.receive(data)

    async def run(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            await settle(2)
            self.exchange()

    async def upload(self, sid: int, body: bytes, end: bool = True) -> None:
        """Send a request body as the server's windows allow."""
        c = self.client.h2
        sent = 0
        for _ in range(100000):
            window = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
            if window:
                chunk = body[sent:sent + window]
                sent += len(chunk)
                c.send_data(sid, chunk, end_stream=end and sent == len(body))
                if sent == len(body):
                    return
            await self.run(1)
        raise AssertionError("the server never opened its window")

    async def push(self, sid: int, body: bytes, rounds: int = 20) -> int:
        """Send as much of `body` as the server's windows allow within
        `rounds` exchanges (no END_STREAM); return how much went."""
        c = self.client.h2
        sent = 0
        for _ in range(rounds):
            while sent < len(body):
                window = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
                if not window:
                    break
                c.send_data(sid, body[sent:sent + window])
                sent += window
            await self.run(1)
        return sent

    async def until(self, predicate: Any, timeout: float = 5.0) -> None:
        """Pump until predicate() holds; timers (send_timeout) need real
        time, so every hundred rounds the loop also waits a millisecond."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rounds = 0
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError("condition never held")
            await settle(1)
            self.exchange()
            rounds += 1
            if rounds % 100 == 0:
                await asyncio.sleep(0.001)

    async def until_hand_over(self) -> None:
        """Send requests one after another until zion hands the connection
        to a fresh zttp codec (past 3,000 streams): a stream the app holds
        open keeps that hand-over waiting, with the router in place."""
        for _ in range(3200):
            r = self.client.responses[self.client.request()]
            await self.until(lambda r=r: r.ended or self.proto.router is not None)
            if self.proto.router is not None:
                return
        raise AssertionError("no hand-over after 3,200 streams")


def parse_frames(data: bytes) -> list[Any]:
    """The HTTP/2 frames in `data` (hyperframe objects), in order."""
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


async def open_tls(port: int, window: int = 65535) -> tuple[Client, asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    client = Client(window)
    writer.write(client.h2.data_to_send())
    return client, reader, writer


async def pump(client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               done: Any, timeout: float = 10.0) -> None:
    """Exchange bytes over a real socket until done() holds or the peer closes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        out = client.h2.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError("timed out waiting on the server")
        try:
            data = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            raise AssertionError("timed out waiting on the server") from None
        if not data:
            return
        client.receive(data)
    out = client.h2.data_to_send()
    if out:
        writer.write(out)
