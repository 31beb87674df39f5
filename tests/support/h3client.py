"""aioquic's HTTP/3 client, as a test drives it: one QUIC connection,
requests as coroutines that return the whole response."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset

# RFC 9114 8.1
H3_REQUEST_REJECTED = 0x10B
_GOAWAY = 0x7


class StreamWasReset(Exception):
    pass


class NotProcessed(Exception):
    """RFC 9114 5.2 / 4.1.1: the server says it did not process this request
    (a GOAWAY below its stream ID, or H3_REQUEST_REJECTED): safe to retry."""


@dataclass
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the answer
    body: bytes = b""
    done: asyncio.Future[Response] | None = None


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.pending: dict[int, Response] = {}
        self.terminated: ConnectionTerminated | None = None
        self.datagrams: list[bytes] = []  # every datagram received, as it came
        # The stream IDs of the server's GOAWAY frames, in order. aioquic's
        # H3Connection reads past GOAWAY without a word, so the client reads
        # the server's control stream itself.
        self.goaways: list[int] = []
        self._uni: dict[int, bytearray] = {}
        self._uni_read: dict[int, int] = {}
        self._ports: set[int] = set()  # every source port rebind() moved to

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        self.datagrams.append(data)
        super().datagram_received(data, addr)

    def send_request(self, path: str = "/") -> int:
        """Start a GET without waiting for its answer."""
        sid = self._quic.get_next_available_stream_id()
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", b"localhost"), (b":path", path.encode())],
                             end_stream=True)
        self.transmit()
        return sid

    async def rebind(self) -> int:
        """Move to a new UDP source port, as a NAT rebinding does: the same
        connection (and CIDs), datagrams from another 4-tuple. Returns the
        new port."""
        loop = asyncio.get_running_loop()
        # A port not used before: the kernel may hand back one an earlier
        # rebind() closed (seen: 7 distinct of 8).
        if self._transport is not None:
            self._ports.add(self._transport.get_extra_info("sockname")[1])
        while True:
            # As aioquic's connect() makes its own: dual-stack, peers as v4-mapped.
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            if sock.getsockname()[1] not in self._ports:
                break
            sock.close()
        self._ports.add(sock.getsockname()[1])
        transport, _ = await loop.create_datagram_endpoint(lambda: _Forward(self), sock=sock)
        old, self._transport = self._transport, transport  # type: ignore[assignment]
        if old is not None:
            old.close()
        return int(transport.get_extra_info("sockname")[1])

    @property
    def reset_token(self) -> bytes:
        """The stateless reset token the server gave for the CID in use."""
        token = self._quic._peer_cid.stateless_reset_token
        assert token
        return token

    @property
    def goaway(self) -> int | None:
        """The last GOAWAY's stream ID: no new request belongs here."""
        return self.goaways[-1] if self.goaways else None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and event.stream_id in self.pending:
            response = self.pending.pop(event.stream_id)
            if response.done is not None and not response.done.done():
                response.done.set_exception(
                    NotProcessed(event.stream_id) if event.error_code == H3_REQUEST_REJECTED
                    else StreamWasReset(event.error_code))
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 3:
            self._server_uni(event.stream_id, event.data)
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            for sid, response in self.pending.items():
                if response.done is not None and not response.done.done():
                    response.done.set_exception(
                        NotProcessed(sid) if self.goaway is not None and sid >= self.goaway
                        else ConnectionError(event.reason_phrase))
            self.pending.clear()
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    async def request_expecting_100(self, path: str, body: bytes) -> Response:
        """A POST with `expect: 100-continue` whose body is sent only once
        the server's 100 came (RFC 9110 10.1.1)."""
        sid = self._quic.get_next_available_stream_id()
        response = Response(done=self._loop.create_future())
        self.pending[sid] = response
        self.h3.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                   (b":authority", b"localhost"), (b":path", path.encode()),
                                   (b"expect", b"100-continue")])
        self.transmit()
        while not response.interim and not response.done.done():
            await asyncio.sleep(0.01)
        self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await response.done

    async def request_after_answer(self, path: str, body: bytes) -> Response:
        """A POST whose body is sent only once the answer's head came (an app
        that answers before it reads)."""
        sid = self._quic.get_next_available_stream_id()
        response = Response(done=self._loop.create_future())
        self.pending[sid] = response
        self.h3.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                   (b":authority", b"localhost"), (b":path", path.encode())])
        self.transmit()
        while not response.status and not response.done.done():
            await asyncio.sleep(0.01)
        self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await response.done

    def _server_uni(self, sid: int, data: bytes) -> None:
        """Frames on the server's control stream (RFC 9114 6.2.1: stream type
        0x00, then frames of type, length, payload): GOAWAYs are noted."""
        buf = self._uni.setdefault(sid, bytearray())
        buf += data
        pos = self._uni_read.get(sid, 0)
        if pos == 0:
            kind = _varint(buf, 0)
            if kind is None:
                return
            if kind[0] != 0:  # not the control stream (QPACK's)
                self._uni_read[sid] = -1
                return
            pos = kind[1]
        if pos < 0:
            return
        while (head := _varint(buf, pos)) is not None \
                and (size := _varint(buf, head[1])) is not None \
                and size[1] + size[0] <= len(buf):
            if head[0] == _GOAWAY:
                goaway = _varint(buf, size[1])
                assert goaway is not None
                self.goaways.append(goaway[0])
                for psid, response in list(self.pending.items()):
                    if psid >= goaway[0] and response.done is not None \
                            and not response.done.done():
                        del self.pending[psid]
                        response.done.set_exception(NotProcessed(psid))
            pos = size[1] + size[0]
        self._uni_read[sid] = pos

    def _h3_event(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived | DataReceived):
            return
        response = self.pending.get(event.stream_id)
        if response is None:
            return
        if isinstance(event, HeadersReceived):
            status = next(int(v) for n, v in event.headers if n == b":status") \
                if not response.status else 0
            if 100 <= status < 200:
                response.interim.append(status)
            elif status:
                response.status = status
                response.headers.update((n, v) for n, v in event.headers if n != b":status")
        else:
            response.body += event.data
        if event.stream_ended:
            self.pending.pop(event.stream_id)
            assert response.done is not None
            if not response.done.done():
                response.done.set_result(response)

    async def request(self, path: str = "/", method: str = "GET", body: bytes = b"",
                      headers: list[tuple[bytes, bytes]] | None = None,
                      authority: bytes = b"localhost") -> Response:
        sid = self._quic.get_next_available_stream_id()
        response = Response(done=self._loop.create_future())
        self.pending[sid] = response
        self.h3.send_headers(sid, [(b":method", method.encode()), (b":scheme", b"https"),
                                   (b":authority", authority), (b":path", path.encode()),
                                   *(headers or [])], end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return await response.done


def _varint(data: bytearray, pos: int) -> tuple[int, int] | None:
    """A QUIC variable-length integer at `pos` and the offset after it, or
    None if `data` does not hold all of it yet (RFC 9000 16)."""
    if pos >= len(data):
        return None
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        return None
    value = data[pos] & 0x3F
    for octet in data[pos + 1:pos + size]:
        value = value << 8 | octet
    return value, pos + size


class _Forward(asyncio.DatagramProtocol):
    """The client's datagrams on its new socket after a rebind."""

    def __init__(self, client: H3Client) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client.datagram_received(data, addr)


def client_configuration() -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_NONE
    return config


@contextlib.asynccontextmanager
async def h3_connect(port: int, host: str = "127.0.0.1") -> AsyncIterator[H3Client]:
    client: H3Client | None = None
    try:
        async with connect(host, port, configuration=client_configuration(),
                           create_protocol=H3Client, wait_connected=True) as connected:
            assert isinstance(connected, H3Client)
            client = connected
            yield client
    finally:
        # After a rebind, the transport is not the one connect() made and
        # closes at the end of its block: this one, even when the test failed.
        if client is not None and client._transport is not None:
            client._transport.close()
