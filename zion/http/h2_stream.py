"""One HTTP/2 stream as the carrier of an exchange (connection.Carrier): the
exchange's response events become HEADERS and DATA frames on zttp, with the
stream's share of the send back-pressure. The connection's rules (windows
given back, floods, GOAWAY, the codec hand-over) are H2Protocol's, in h2.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import TYPE_CHECKING

from zion.http import zttp_shim
from zion.http.exchange import ProtocolError
from zion.http.wakeup import Wakeup
from zion.http.zttp_shim import H2ErrorCode

if TYPE_CHECKING:
    from zion.http.exchange import Exchange
    from zion.http.h2 import H2Protocol
    from zion.http.h2_tunnel import StreamTransport

# Body bytes zttp may hold for a stream whose window is shut before the app's
# send() waits for the client.
_STREAM_HIGH = 65536
# Send back-pressure whatever window the client advertises (up to 2^31-1, RFC
# 9113 6.9.1): zttp moves what the window allows into its output queue at
# once, and that queue reaches the transport only when we flush it. Past this
# many unflushed bytes a writer's drain() flushes at once, so the transport's
# own high-water mark (write_buffer_high -> pause_writing) sees them and the
# writer waits; and a writer yields to the loop after every write_buffer_high
# bytes the transport took, so one fast reader (nghttp -w30 -W30) cannot hold
# the loop, and every other client of the worker, for a whole download.
_FLUSH_HIGH = 65536
# content-length values of small answers, made once (a format is ~0.1 µs).
_SMALL = 1024
_LENGTHS = [b"%d" % n for n in range(_SMALL)]
# A frame header (RFC 9113 4.1): length (24 bits), type, flags, stream id.
_FRAME = struct.Struct("!BHBBI").pack
_END_STREAM, _END_HEADERS = zttp_shim.END_STREAM, zttp_shim.END_HEADERS
# zttp's HEADERS frame of a head without fields: its 9 bytes and ":status"
# as a literal on the static name (0x08, 3 digits).
_HEAD_ONLY = 9 + 5

class H2Stream:
    """One stream as the Connection an Exchange talks to."""

    __slots__ = ("proto", "state", "loop", "client", "server", "stream_id", "handle",
                 "exchange", "tunnel", "ended", "closed", "window", "received", "earned",
                 "credited", "client_ended", "body_deadline", "discard_until")
    # connection.Carrier: the Task's first step on the next loop turn. Run
    # inside the read instead (task_start, as HTTP/1.1's first request), it
    # cost more than the turn it saves on Python 3.11: bench/h2_instructions.py
    # --uvloop +5.1k instructions a request one stream at a time, +3.3k at 16;
    # h2load -c 16 -m 1, 2 workers, 6 interleaved rounds each (load 2):
    # 11.4k against 13.2k req/s, 116 against 98 µs of server CPU a request,
    # with the same syscalls (strace: one read, one write a request) - the
    # response already leaves in one write, from the step that ends it.
    start_now = False

    def __init__(self, proto: H2Protocol, stream_id: int) -> None:
        self.proto = proto
        self.state = proto.state
        self.loop = proto.loop
        self.client = proto.client
        self.server = proto.server
        self.stream_id = stream_id
        self.handle = proto.conn.stream(stream_id)
        self.exchange: Exchange | None = None
        self.tunnel: StreamTransport | None = None  # a WebSocket's (RFC 8441), not an exchange
        self.ended = False  # END_STREAM sent
        self.client_ended = False  # END_STREAM received
        self.closed = False  # reset, or the connection is gone
        # Made when a writer waits: the client opened this stream's window.
        self.window: Wakeup | None = None
        # Receive flow control: body bytes received, the credit zttp would have
        # given back (frame bytes, padding included), the credit we gave back.
        self.received = 0
        self.earned = 0
        self.credited = 0
        self.body_deadline = 0.0  # body_timeout while the request body arrives
        self.discard_until = 0  # answered: the rest of the body is dropped up to here

    # -- the exchange's response as HEADERS and DATA (connection.Carrier) --------

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]],
                       length: int | None, body: bytes, end: bool, own_server: bool) -> None:
        if self.closed:
            return
        proto = self.proto
        if length is not None:
            headers.append((b"content-length",
                            _LENGTHS[length] if 0 <= length < _SMALL else b"%d" % length))
        if proto.state.date.prefix is proto.date_prefix:  # the tick has not changed them
            headers += proto.date_pairs_own if own_server else proto.date_pairs
        else:
            headers += proto.default_headers(own_server)
        # Our own header block (hpack.py: indexed fields) in the HEADERS
        # frame zttp makes for a head without fields; zttp's own (literal
        # fields) when it is to refuse a field, or to write the head later (an
        # h2c upgrade's, before the client's preface).
        encoder = proto.encoder
        block: bytes | None
        if status == encoder.last_status and headers == encoder.last_fields:
            block = encoder.last_block
        elif proto.preface_due:
            block = None  # not even looked at: head() may add to the table
        else:
            block = encoder.head(status, headers)
        handle = self.handle
        size = len(body)
        if block is None:
            try:
                if end and not size:
                    # END_STREAM rides on the HEADERS frame: no empty DATA frame.
                    handle.send_response(status, headers, True)
                else:
                    handle.send_response(status, headers)
                    if size:
                        handle.send_data(body)
                        proto.unflushed += size
                    if end:
                        handle.end_message()
            except zttp_shim.LocalProtocolError:
                raise ProtocolError(f"invalid response header for status {status}") from None
        else:
            conn = proto.conn
            out = proto.out
            queued = conn.data_to_send()  # others' frames first, in the order zttp made them
            if queued:
                out.append(queued)
            try:
                if end and not size:
                    handle.send_response(status, None, True)
                else:
                    handle.send_response(status)
                    if size:
                        handle.send_data(body)
                        proto.unflushed += size
                    if end:
                        handle.end_message()
                made = conn.data_to_send()
                sid = self.stream_id
                frames: bytes | None
                if end and not size and len(made) == _HEAD_ONLY:
                    # That HEADERS frame alone, END_STREAM set.
                    frames = _FRAME(0, len(block), 1, _END_HEADERS | _END_STREAM, sid) + block
                elif end and size and len(made) == _HEAD_ONLY + 18 + size:
                    # HEADERS, all of the body in one DATA frame (so under
                    # 16384 bytes, RFC 9113 4.2), and zttp's empty END_STREAM
                    # one: END_STREAM on the body's instead. Two packs and a
                    # join (~0.35 µs), not a bytes format (~0.65 µs).
                    frames = b"".join((_FRAME(0, len(block), 1, _END_HEADERS, sid), block,
                                       _FRAME(0, size, 0, _END_STREAM, sid), body))
                else:
                    frames = zttp_shim.own_head(made, sid, block)
            except zttp_shim.LocalProtocolError:
                frames = None  # not for a valid status on an open stream
            if frames is None:
                # The client's table now differs from the encoder's: no block
                # can be trusted on this connection any more.
                proto.fail_connection(H2ErrorCode.INTERNAL_ERROR, "response head not written")
                return
            out.append(frames)
        if end:
            self.ended = True
            # The stream is done: H2Protocol._stream_gone sends it, at once
            # when no other stream is open (no extra loop iteration per request).
        else:
            proto.wrote()

    def send_body(self, data: bytes, end: bool) -> None:
        if self.closed or self.ended:
            return
        if data and end:
            # END_STREAM on this DATA frame, not on an empty one of zttp's.
            self.ended = True
            proto = self.proto
            conn = proto.conn
            queued = conn.data_to_send()  # others' frames first
            if queued:
                proto.out.append(queued)
            self.handle.send_data(data)
            proto.unflushed += len(data)
            self.handle.end_message()
            proto.out.append(zttp_shim.end_on_last_data(conn.data_to_send()))
            return  # sent by H2Protocol._stream_gone, which follows
        if data:
            self.handle.send_data(data)
            self.proto.unflushed += len(data)
        if end:
            self.ended = True
            self.handle.end_message()  # sent by H2Protocol._stream_gone, which follows
        else:
            self.proto.wrote()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.end(headers)

    def send_continue(self) -> None:
        if not self.closed and not self.ended:
            self.handle.send_informational(100)
            self.proto.wrote()

    def write(self, data: bytes) -> None:
        """A WebSocket's frames (h2_tunnel), as DATA."""
        if not self.closed and data:
            self.handle.send_data(data)
            proto = self.proto
            proto.unflushed += len(data)
            proto.wrote()

    async def drain(self) -> None:
        """Wait while this response has about write_buffer_high queued in
        zion, zttp and the transport together, whatever the client's window."""
        proto = self.proto
        if proto.unflushed >= _FLUSH_HIGH:
            proto.flush_now()  # the transport sees them: it may pause_writing now
        if not self.closed and self._parked():
            deadline = self.loop.time() + proto.limits.send_timeout
            while not self.closed and self._parked():
                left = deadline - self.loop.time()
                if left <= 0:
                    # The client keeps this stream's window shut: a zero-window
                    # stall would hold the app (and its memory) for ever.
                    proto.reset(self, H2ErrorCode.FLOW_CONTROL_ERROR)
                    break
                if self.window is None:
                    self.window = Wakeup(self.loop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.window.wait(), left)
        if proto.flow.write_paused:
            await proto.flow.drain()
        elif proto.since_yield >= proto.limits.write_buffer_high:
            # The transport took it all at once (a fast reader): let the
            # loop serve the worker's other clients before the next chunk.
            proto.since_yield = 0
            await asyncio.sleep(0)

    def _parked(self) -> bool:
        """Too much of this stream waits for the client's window: over
        _STREAM_HIGH of its own, or any while the connection's streams
        together hold over write_buffer_high (a client that opens many
        streams and their windows not at all)."""
        pending = self.handle.pending_bytes or 0
        if pending > _STREAM_HIGH:
            return True
        if not pending:
            return False
        total = sum(s.handle.pending_bytes or 0 for s in self.proto.streams.values())
        return total > self.proto.limits.write_buffer_high

    def pause_reading(self) -> None:
        """Nothing to do: this stream's window, not the socket, bounds what
        an app that does not read may be sent."""

    def resume_reading(self) -> None:
        # The app has read: it may be owed window.
        proto = self.proto
        if self.earned > self.credited or proto.conn_earned > proto.conn_credited:
            proto.credit_later()

    def exchange_done(self, exchange: Exchange) -> None:
        self.proto.stream_done(self, exchange)

    def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if not self.ended and not self.closed:
            self.ended = True
            try:
                self.handle.end_message(trailers) if trailers else self.handle.end_message()
            except zttp_shim.LocalProtocolError:
                raise ProtocolError("invalid response trailers") from None
            # Sent by H2Protocol._stream_gone, which follows.

    def close(self) -> None:
        """A response that cannot be finished: reset this stream only."""
        self.proto.reset(self, H2ErrorCode.INTERNAL_ERROR)

    def lost(self) -> None:
        self.closed = True
        if self.window is not None:
            self.window.wake()
        ex = self.exchange
        if ex is not None:
            self.exchange = None  # no cycle left to the cyclic collector (h2.stream_done)
            ex.lost()
        elif self.tunnel is not None:
            self.tunnel.lost()

    def window_opened(self) -> None:
        if self.window is not None:
            self.window.wake()
        if self.tunnel is not None:
            self.tunnel.window_opened()
