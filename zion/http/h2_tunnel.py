"""WebSocket over HTTP/2 (RFC 8441): one stream as the WebSocket's transport.

A client that saw SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 opens a stream with
`:method CONNECT` and `:protocol websocket`; the stream then carries
WebSocket frames both ways in DATA frames, and a 200 answers the handshake
instead of a 101 (RFC 8441 4, 5).

The WebSocket layer (zion/http/websocket.py) knows which version carries
it: over HTTP/2 it is built with no HTTP/1.1 request (raw_request None),
checks the extended CONNECT's headers itself and answers through respond()
with a status and header pairs - no Sec-WebSocket-Key is invented and no
101 is parsed back (RFC 8441 5). Frames then go both ways as DATA.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from zion.http.websocket import Budget

if TYPE_CHECKING:
    from zion.http.h2 import H2Protocol
    from zion.http.h2_stream import H2Stream

# Hop-by-hop in HTTP/1.1, meaningless or forbidden over HTTP/2 (RFC 9113
# 8.2.2), or the upgrade's own: never copied into the HEADERS frame.
_NOT_FORWARDED = frozenset({b"connection", b"upgrade", b"sec-websocket-accept", b"keep-alive",
                            b"transfer-encoding", b"content-length", b"date", b"server"})
# Past this many bytes waiting for the client's window, the WebSocket's
# send() waits (its FlowControl), as it does on a full TCP write buffer.
_HIGH = 65536


class StreamTransport(asyncio.Transport):
    """The asyncio.Transport a WebSocketProtocol writes to, over one stream."""

    def __init__(self, proto: H2Protocol, stream: H2Stream) -> None:
        super().__init__()
        self.proto = proto
        self.stream = stream
        self.protocol: Any = None
        self.answered = False  # respond() was called
        self.open = False  # ...with a 2xx: WebSocket frames follow
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
            self._release()

    def window_opened(self) -> None:
        if self.write_paused and not self.closed and not self._busy():
            self.write_paused = False
            self.protocol.resume_writing()

    # -- asyncio.Transport -------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # WebSocket frames, once the handshake was accepted; nothing before
        # the answer, nothing after a refusal (its body went with respond()).
        if self.closed or self.stream.closed or not self.open:
            return
        if data:
            self.stream.write(bytes(data))
            if self.proto.unflushed >= _HIGH:
                # Whatever the client's window: the transport must see it to
                # push back (h2_stream.py, _FLUSH_HIGH).
                self.proto.flush_now()
            if not self.write_paused and self._busy():
                self.write_paused = True
                self.protocol.pause_writing()

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
        # RFC 8441 5: a 2xx accepts the extended CONNECT; the stream stays open.
        self.open = 200 <= status < 300 and not end
        self.stream.start_response(status, pairs, None, body, not self.open, False)

    def _busy(self) -> bool:
        return (self.stream.handle.pending_bytes or 0) > _HIGH or self.proto.flow.write_paused

    def close(self) -> None:
        """The WebSocket is done (close handshake over, or refused): END_STREAM,
        then, as a socket would, connection_lost."""
        if self.closed:
            return
        self.closed = True
        if not self.answered:
            self.stream.start_response(500, [], None, b"", True, False)
        self.proto.tunnel_done(self.stream)
        self.proto.loop.call_soon(self.protocol.connection_lost, None)
        self._release()

    def _release(self) -> None:
        """Closed: drop the references back, as asyncio's transports drop
        their protocol after connection_lost. The WebSocket refers to us
        (its transport) and we to it, the stream to us and we to it; left
        in place, these cycles kept the WebSocket's queued messages, the
        stream and the whole HTTP/2 connection until a full cyclic
        collection. Nothing reads them once `closed` is set."""
        self.protocol = None
        if self.stream.tunnel is self:
            self.stream.tunnel = None

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
        if name == "websocket_budget":
            # One for all the connection's WebSockets: each stream's own
            # bounds would let one client hold h2_max_streams of them.
            if self.proto.ws_budget is None:
                self.proto.ws_budget = Budget()
            return self.proto.ws_budget
        transport = self.proto.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.stream.handle.pending_bytes or 0
