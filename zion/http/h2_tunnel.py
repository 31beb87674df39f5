"""WebSocket over HTTP/2 (RFC 8441): one stream as the WebSocket's transport.

A client that saw SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 opens a stream with
`:method CONNECT` and `:protocol websocket`; the stream then carries
WebSocket frames both ways in DATA frames, and a 200 answers the handshake
instead of a 101 (RFC 8441 4, 5).

The WebSocket layer (zion/http/websocket.py, over the `websockets` library's
sans-I/O ServerProtocol) speaks HTTP/1.1 for its handshake. This transport
lets it, unchanged: the request it is given is the same one as an HTTP/1.1
upgrade (the key RFC 8441 drops is made up here; its answer, the accept
hash, is dropped again), and the first thing it writes - its 101, or an
HTTP/1.1 error answer - becomes the stream's HEADERS (and DATA).
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zion.http.h2 import H2Protocol, H2Stream

# Hop-by-hop in HTTP/1.1, meaningless or forbidden over HTTP/2 (RFC 9113
# 8.2.2), or the upgrade's own: never copied into the HEADERS frame.
_NOT_FORWARDED = frozenset({b"connection", b"upgrade", b"sec-websocket-accept", b"keep-alive",
                            b"transfer-encoding", b"content-length", b"date", b"server"})
# Past this many bytes waiting for the client's window, the WebSocket's
# send() waits (its FlowControl), as it does on a full TCP write buffer.
_HIGH = 65536


def upgrade_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 upgrade request the WebSocket layer checks, from an
    extended CONNECT's headers (RFC 8441 5: no Sec-WebSocket-Key over HTTP/2)."""
    key = base64.b64encode(os.urandom(16))
    return [*headers, (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-key", key)]


class StreamTransport(asyncio.Transport):
    """The asyncio.Transport a WebSocketProtocol writes to, over one stream."""

    def __init__(self, proto: H2Protocol, stream: H2Stream) -> None:
        super().__init__()
        self.proto = proto
        self.stream = stream
        self.protocol: Any = None
        self.head = b""  # the HTTP/1.1 answer, until it is complete
        self.answered = False
        self.status = 0
        self.body_left = 0  # of a refusal's body
        self.closed = False
        self.read_paused = False
        self.write_paused = False

    # -- what the stream feeds -------------------------------------------------

    def start(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.connection_made(self)

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self.protocol.data_received(data)

    def feed_eof(self) -> None:
        if not self.closed:
            self.protocol.eof_received()

    def lost(self) -> None:
        """The stream was reset or the connection is gone."""
        if self.protocol is not None and not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    def window_opened(self) -> None:
        if self.write_paused and not self.closed and not self._busy():
            self.write_paused = False
            self.protocol.resume_writing()

    # -- asyncio.Transport -------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.stream.closed:
            return
        data = bytes(data)
        if not self.answered:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = self.head[end + 4:]
            self._answer(self.head[:end])
            self.head = b""
        if self.status != 101:
            data = data[:self.body_left]  # a refusal's body; nothing after it
            self.body_left -= len(data)
        if data:
            self.stream.write(data)
            if self.proto.unflushed >= _HIGH:
                # Whatever the client's window: the transport must see it to
                # push back (h2.py, _FLUSH_HIGH).
                self.proto.flush_now()
            if not self.write_paused and self._busy():
                self.write_paused = True
                self.protocol.pause_writing()

    def _answer(self, head: bytes) -> None:
        """The WebSocket layer's HTTP/1.1 answer as the stream's HEADERS."""
        self.answered = True
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.body_left = int(value)
            elif name not in _NOT_FORWARDED:
                headers.append((name, value.strip()))
        if self.status == 101:
            # RFC 8441 5: a 2xx accepts the extended CONNECT; the stream stays open.
            self.stream.start_response(200, headers, b"", True)
        else:
            self.stream.start_response(self.status, headers, b"", self.body_left > 0)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                end: bool) -> None:
        """The version-aware handshake (RFC 8441 5): the WebSocket layer's
        answer as events - a 2xx with end=False accepts (the stream stays
        open for frames), anything else refuses. No key was invented and no
        101 is parsed back on this path (see /work/wt/exchange-ws.md)."""
        if self.closed or self.stream.closed or self.answered:
            return
        self.answered = True
        pairs = [(n.lower(), v) for n, v in headers if n.lower() not in _NOT_FORWARDED]
        if 200 <= status < 300 and not end:
            self.status = 101  # here: the tunnel is open, write() passes frames on
            self.stream.start_response(status, pairs, body, True)
        else:
            self.status = status
            self.body_left = 0  # the refusal's body goes with its HEADERS
            self.stream.start_response(status, pairs, body, False)

    def _busy(self) -> bool:
        return (self.stream.handle.pending_bytes or 0) > _HIGH or self.proto.flow.write_paused

    def close(self) -> None:
        """The WebSocket is done (close handshake over, or refused): END_STREAM,
        then, as a socket would, connection_lost."""
        if self.closed:
            return
        self.closed = True
        if not self.answered:
            self.stream.start_response(500, [], b"", False)
        self.proto.tunnel_done(self.stream)
        self.proto.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed or self.stream.closed

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        # The stream's window, not the socket: the client may send one
        # window more, the other streams go on.
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.proto.credit_later()

    def is_reading(self) -> bool:
        return not self.read_paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.proto.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.stream.handle.pending_bytes or 0
