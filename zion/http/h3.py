"""HTTP/3 (RFC 9114) over a worker's QUIC endpoint: every request stream is
an Exchange, answered by the same handler chain, limits, accounting and
access log as HTTP/1.1 and HTTP/2 (`http_version` "3").

QUIC and HTTP/3 framing come from aioquic 1.7 (docs/http3.md says why
aioquic and not zttp's QuicEndpoint); zion/quic/endpoint.py routes the
datagrams, this module turns a connection's HTTP/3 events into exchanges.

Who bounds what:
- Request bodies: max_body_size (413, from content-length before any body
  is read, else as it arrives) and body_timeout (408), via rules.py as on
  the other protocols. A stream's receive window slides only past what the
  app read (zion/quic/connection.py), so an app that does not read holds at
  most its window per stream, and a connection at most
  limits.h3_max_streams requests at once (zion/quic/connection.py). A
  worker's connections together: limits.unread_body_per_worker, as HTTP/2's
  (recount).
- Responses: a writer waits (drain) while its stream has more than
  _STREAM_HIGH bytes not yet acknowledged in aioquic's send buffer, or the
  connection's streams together more than write_buffer_high, whatever
  window the client advertised; a client that leaves a response unread for
  send_timeout gets its stream reset (H3_REQUEST_CANCELLED).
- 100 Continue: sent when the app first reads a body the client holds
  back (`expect: 100-continue`), as on the other protocols.
- Extended CONNECT (RFC 9220 WebSocket over HTTP/3) is not served, so it is
  not advertised: aioquic's SETTINGS say ENABLE_CONNECT_PROTOCOL = 1, which
  zion takes out (_H3Connection); a client then opens its WebSocket over
  HTTP/2 or HTTP/1.1 (RFC 9220 3). One that sends a CONNECT with :protocol
  anyway is answered 501, as HTTP/2 answers a protocol it does not serve.

Closing (a drain, a reload, keepalive_timeout): RFC 9114 5.2's graceful
shutdown, which aioquic has no call for. A first GOAWAY with the largest
stream ID says "no new requests here"; once the client acknowledged it (so
what it sent before is in), a second GOAWAY names the first stream ID not
processed, and later request streams are refused with H3_REQUEST_REJECTED
(the client may retry them elsewhere: nothing was done). Requests below it
are answered; the connection closes (H3_NO_ERROR) when they all are and the
client acknowledged the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import (
    H3_ALPN,
    ErrorCode,
    FrameType,
    H3Connection,
    Setting,
    encode_frame,
)
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.h3.exceptions import H3Error
from aioquic.quic import events

from zion.http import rules
from zion.http.exchange import Exchange, ProtocolError
from zion.http.files import PATHSEND
from zion.http.wakeup import Wakeup
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.state import ServerState
    from zion.quic.endpoint import Link

log = get_logger("zion.http")

# Unacknowledged response bytes one stream may have in aioquic before its
# writer waits (see the module docstring).
_STREAM_HIGH = 65536
# RFC 9114 5.2: the largest client-initiated bidirectional stream ID; a
# GOAWAY naming it refuses no request the client has already sent.
_GOAWAY_ALL = (1 << 62) - 4
# Seconds a closing session waits for the client to acknowledge its GOAWAY
# before going on without: a client that went away acknowledges nothing,
# and it must not hold a draining worker until drain_timeout.
_GOAWAY_WAIT = 2.0


class _H3Connection(H3Connection):
    """aioquic's, without SETTINGS_ENABLE_CONNECT_PROTOCOL, which it always
    sends as 1 (for its WebSocket demo): the setting tells a client that
    extended CONNECT, WebSocket over HTTP/3, is served (RFC 9220 3), and a
    browser that believed it would open its WebSocket here and get 501
    instead of using HTTP/2 or HTTP/1.1. (_get_local_settings is aioquic's
    own method, pinned to 1.7 in pyproject.toml; tests/http/test_h3.py reads
    the SETTINGS a real client receives.)"""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings.pop(Setting.ENABLE_CONNECT_PROTOCOL, None)
        return settings


class H3Stream:
    """One request stream as the Connection an Exchange talks to."""

    __slots__ = ("session", "state", "loop", "client", "server", "stream_id", "exchange",
                 "ended", "closed", "body_deadline", "writable")
    start_now = False  # connection.Carrier: dispatched amid aioquic's events

    def __init__(self, session: H3Session, stream_id: int) -> None:
        self.session = session
        self.state = session.state
        self.loop = session.loop
        self.client = session.client
        self.server = session.server
        self.stream_id = stream_id
        self.exchange: Exchange | None = None
        self.ended = False  # our FIN queued
        self.closed = False  # reset, or the connection is gone
        self.body_deadline = 0.0
        self.writable: Wakeup | None = None  # made when a writer waits

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]],
                       length: int | None, body: bytes, end: bool, own_server: bool) -> None:
        if self.closed:
            return
        session = self.session
        date = session.state.date
        pairs = [(b":status", b"%d" % status), *headers]
        if length is not None:
            pairs.append((b"content-length", b"%d" % length))
        pairs += date.pairs_without_server if own_server else date.pairs
        h3 = session.h3
        try:
            # A response that ends here ends the stream with its HEADERS frame.
            h3.send_headers(self.stream_id, pairs, end_stream=end and not body)
            if body:
                h3.send_data(self.stream_id, body, end_stream=end)
        except (H3Error, ValueError, AssertionError) as exc:
            raise ProtocolError(f"invalid response header for status {status}: {exc}") from None
        self.ended = end
        session.link.transmit_soon()

    def send_body(self, data: bytes, end: bool) -> None:
        if self.closed or self.ended:
            return
        if data or end:
            self.session.h3.send_data(self.stream_id, data, end_stream=end)
            self.ended = end
            self.session.link.transmit_soon()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.end(headers)

    def send_continue(self) -> None:
        if not self.closed:
            self.session.h3.send_headers(self.stream_id, [(b":status", b"100")])
            self.session.link.transmit_soon()

    def unacked(self) -> int:
        stream = self.session.quic._streams.get(self.stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    async def drain(self) -> None:
        """Wait while this response has too much unacknowledged in aioquic
        (see _parked), at most send_timeout; then the stream is reset."""
        session = self.session
        if self.closed or not self._parked():
            return
        deadline = self.loop.time() + session.limits.send_timeout
        while not self.closed and self._parked():
            left = deadline - self.loop.time()
            if left <= 0:
                log.info("h3_send_timeout", client=self.client[0] if self.client else None,
                         stream=self.stream_id)
                session.reset(self, ErrorCode.H3_REQUEST_CANCELLED)
                break
            if self.writable is None:
                self.writable = Wakeup(self.loop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.writable.wait(), left)

    def _parked(self) -> bool:
        pending = self.unacked()
        if pending > _STREAM_HIGH:
            return True
        if not pending:
            return False
        total = sum(s.unacked() for s in self.session.streams.values())
        return total > self.session.limits.write_buffer_high

    def pause_reading(self) -> None:
        # The app has _BODY_HIGH_WATER unread: this stream's window stays
        # where it is (the client may send up to it, no further).
        self.session.quic.held_streams.add(self.stream_id)

    def resume_reading(self) -> None:
        quic = self.session.quic
        if self.stream_id in quic.held_streams:
            quic.held_streams.discard(self.stream_id)
            self.session.link.transmit_soon()  # the window may move now

    def exchange_done(self, exchange: Exchange) -> None:
        self.session.stream_done(self, exchange)

    def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.ended or self.closed:
            return
        self.ended = True
        h3 = self.session.h3
        if trailers:
            try:
                h3.send_headers(self.stream_id, trailers, end_stream=True)
            except (H3Error, ValueError, AssertionError):
                raise ProtocolError("invalid response trailers") from None
        else:
            h3.send_data(self.stream_id, b"", end_stream=True)
        self.session.link.transmit_soon()

    def close(self) -> None:
        """A response that cannot be finished: reset this stream only."""
        self.session.reset(self, ErrorCode.H3_INTERNAL_ERROR)

    def lost(self) -> None:
        self.closed = True
        if self.writable is not None:
            self.writable.wake()
        if self.exchange is not None:
            self.exchange.lost()


class H3Session:
    """One QUIC connection carrying HTTP/3: its streams and their exchanges.
    Registered with the worker's connections (tick, drain, max_connections)."""

    def __init__(self, state: ServerState, link: Link, server: tuple[str, int] | None) -> None:
        self.state = state
        self.loop = state.loop
        self.limits = state.limits
        self.link = link
        self.quic = link.quic
        self.h3: Any = None  # the H3Connection, once ALPN chose h3
        self.server = server
        self.client: tuple[str, int] | None = None
        self.proxied = False
        self.streams: dict[int, H3Stream] = {}
        self.overloaded = rules.over_connections(state)
        self.closing = False  # shutting down: GOAWAY sent (or no HTTP/3 yet)
        self.goaway_at = 0.0  # when the last GOAWAY was queued
        # The stream ID of our last GOAWAY: request streams from it on are
        # refused (H3_REQUEST_REJECTED); None until the second GOAWAY.
        self.refuse_from: int | None = None
        self.rejected: set[int] = set()
        self.closed = False  # our CONNECTION_CLOSE is queued
        self.gone = False
        self.idle_since = self.loop.time()  # no request in progress since
        self.opened_at = self.idle_since
        self.handshake_done = False
        # Body bytes its apps have not read: this connection's share of
        # state.unread_body (added as they arrive, recounted as they go).
        self.unread = 0
        # The last tick that saw zion withhold the connection's window from
        # the client (check_deadline): its bodies' deadlines wait with it.
        self.withheld_at = 0.0
        state.connection_opened(self)

    # -- from the endpoint ------------------------------------------------------

    def quic_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = _H3Connection(self.quic)
                addr = self.quic.get_peer_address()
                self.client = (addr[0], addr[1]) if addr else None
                self.proxied = self.state.speaks_for_clients(self.client)
            return
        if isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            counters = self.state.counters
            counters.tls_handshakes += 1
            if event.session_resumed:
                counters.tls_resumed += 1
            return
        if isinstance(event, events.StreamReset):
            stream = self._forget(event.stream_id)
            if stream is not None:
                stream.lost()
        if self.h3 is None:
            return
        if self.refuse_from is not None and isinstance(
                event, events.StreamDataReceived | events.StreamReset) \
                and event.stream_id % 4 == 0 and event.stream_id >= self.refuse_from:
            self._reject(event.stream_id)
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                if h3_event.stream_id not in self.streams:
                    self._request(h3_event)
                elif h3_event.stream_ended:
                    self._body_end(h3_event.stream_id)  # trailers end the body
            elif isinstance(h3_event, DataReceived):
                self._data(h3_event)

    def transmitted(self) -> None:
        # Acknowledgements may have emptied send buffers.
        for stream in self.streams.values():
            if stream.writable is not None:
                stream.writable.wake()
        if self.closing:
            self._step()  # a GOAWAY or the last answers may be acknowledged now

    def ended(self) -> None:
        self.gone = True
        self.state.unread_body -= self.unread  # its buffers go with it
        self.unread = 0
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()
        self.state.connection_closed(self)

    # -- requests ---------------------------------------------------------------

    def _request(self, event: HeadersReceived) -> None:
        sid = event.stream_id
        if sid % 4 != 0:
            return  # not a client-initiated bidirectional stream: no request
        stream = H3Stream(self, sid)
        self.streams[sid] = stream
        method = raw_path = authority = protocol = b""
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        cookies: list[bytes] = []
        length: bytes | None = None
        has_host = False
        expect_100 = False
        for name, value in event.headers:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    raw_path = value
                elif name == b":authority":
                    authority = value
                elif name == b":protocol":
                    protocol = value
                continue
            if name == b"cookie":
                cookies.append(value)  # RFC 9114 4.2.1: crumbs are joined
                continue
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect_100 = value.lower() == b"100-continue"
            elif name == b"host":
                has_host = True
            headers.append((name, value))
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        if authority and not has_host:
            # Frameworks read the host header; RFC 9114 4.3.1 makes :authority its equal.
            headers.append((b"host", authority))
        path_bytes, _, query = raw_path.partition(b"?")
        try:
            path = path_bytes.decode("ascii")
        except UnicodeDecodeError:
            path = ""
        if "%" in path:
            path = urllib.parse.unquote(path)
        # As HTTP/2's (less "tls": with client certificates asked for, which
        # aioquic cannot, HTTP/3 is refused at start-up, zion/settings.py).
        scope = rules.http_scope(self.state, "3", method.decode("ascii", "replace"), path,
                                 path_bytes, query, headers, self.client, self.server,
                                 {"http.response.trailers": {}, PATHSEND: {}}, self.proxied)
        # time.monotonic(), not loop.time(), for started_at (see h1.py).
        ex = stream.exchange = Exchange(stream, scope, True, expect_100, time.monotonic())
        if event.stream_ended:
            ex.message_complete()
        else:
            stream.body_deadline = rules.body_deadline(self.limits, self.loop.time())
        refusal = rules.head_refusal(self.state, self.overloaded, length, path_bytes, method)
        if size > self.limits.max_header_size or len(headers) > self.limits.max_headers:
            ex.fail(431, "header section too large")
        elif not path and method != b"CONNECT":
            ex.fail(400, "non-ASCII request target")
        elif refusal is not None:
            self.refuse(stream, ex, refusal)
        elif method == b"CONNECT":
            # RFC 9220 (WebSocket over HTTP/3) and plain CONNECT: not served.
            what = f"extended CONNECT for {protocol!r}" if protocol else "CONNECT"
            ex.fail(501, f"{what} is not supported over HTTP/3")
        else:
            self.state.dispatch(ex)

    def _data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return  # answered and forgotten: the rest of its body is dropped
        ex = stream.exchange
        data = event.data
        if ex is not None and not ex.response_complete and not ex.body_complete and data:
            refusal = rules.body_chunk(self.limits, ex.received, len(data))
            if refusal is not None:
                self.refuse(stream, ex, refusal)
                return
            ex.feed_body(data)
            stream.body_deadline = rules.body_deadline(self.limits, self.loop.time())
            size = len(data)
            self.unread += size
            self.state.unread_body += size
            if rules.over_unread_budget(self.state):
                # Counted exactly, not as added up since the last count: an
                # app that reads as fast as its body comes would be withheld
                # all of it until the next tick (one window per tick).
                self.recount()
        if event.stream_ended:
            self._body_end(event.stream_id)

    def _body_end(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None and stream.exchange is not None:
            stream.body_deadline = 0.0
            stream.exchange.message_complete()

    def refuse(self, stream: H3Stream, ex: Exchange, refusal: rules.Refusal) -> None:
        rules.refuse(ex, refusal, lambda: self.reset(stream, ErrorCode.H3_REQUEST_CANCELLED))

    def stream_done(self, stream: H3Stream, ex: Exchange) -> None:
        rules.request_done(self.state, ex)
        if not stream.ended:
            stream.end()
        if not ex.body_complete and not stream.closed:
            # RFC 9114 4.1.2: a complete answer before the whole request; ask
            # the client to stop sending the rest (STOP_SENDING, H3_NO_ERROR).
            with contextlib.suppress(Exception):
                self.quic.stop_stream(stream.stream_id, ErrorCode.H3_NO_ERROR)
        self.quic.held_streams.discard(stream.stream_id)
        self._forget(stream.stream_id)
        stream.closed = True
        self.link.transmit_soon()
        if self.closing or self.state.draining:
            self.shutdown()

    def _forget(self, sid: int) -> H3Stream | None:
        stream = self.streams.pop(sid, None)
        if not self.streams:
            self.idle_since = self.loop.time()
        return stream

    def recount(self) -> None:
        """This connection's unread body, into state.unread_body; and what
        its connection window withholds for it (zion/quic/connection.py),
        by the rule HTTP/2 takes too (rules.unread_withheld)."""
        unread = 0
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None:
                unread += ex.body_size
        withheld = rules.unread_withheld(self.state, self.unread, unread)
        self.unread = unread
        quic = self.quic
        if withheld < quic.withheld:
            self.link.transmit_soon()  # MAX_DATA may move on now
        quic.withheld = withheld

    def reset(self, stream: H3Stream, code: int) -> None:
        if stream.closed:
            return
        if self._forget(stream.stream_id) is not None:
            with contextlib.suppress(Exception):
                self.quic.reset_stream(stream.stream_id, code)
            self.quic.held_streams.discard(stream.stream_id)
            self.link.transmit_soon()
        stream.lost()

    # -- the worker's tick and drain (OpenConnection) ---------------------------

    def check_deadline(self, now: float) -> None:
        if self.gone:
            return
        if not self.handshake_done:
            if now - self.opened_at >= self.limits.handshake_timeout:
                # An Initial costs a sender nothing (and its source address
                # may be forged); the connection it made is dropped after
                # handshake_timeout, not QUIC's idle timeout.
                log.debug("h3_handshake_timeout", client=self.client)
                self.link.abandon()
            return
        if self.unread or self.quic.withheld:
            # Apps read, streams went (reset, answered), other connections
            # closed: twice a second is soon enough to bring the worker's
            # count down, and the window on if that took it under budget.
            self.recount()
        if self.quic.withheld and self.quic.window_left < rules.WINDOW_SHUT:
            self.withheld_at = now
        for stream in list(self.streams.values()):
            ex = stream.exchange
            if stream.body_deadline and now >= stream.body_deadline and ex is not None:
                stream.body_deadline = 0.0
                if not ex.body_complete:
                    # Not while the app holds unread body, nor while zion
                    # withholds the connection's window: as HTTP/2 (the
                    # client waits for the app or the worker).
                    stream.body_deadline = rules.body_wait(self.limits, ex, now,
                                                           self.withheld_at)
                    if not stream.body_deadline:
                        self.refuse(stream, ex, rules.BODY_TIMED_OUT)
        if self.state.draining or self.closing or (
                not self.streams and now - self.idle_since >= self.limits.keepalive_timeout):
            # Draining (a GOAWAY is safe with requests in flight: they are
            # answered), or idle for keepalive_timeout, as HTTP/1.1 and HTTP/2.
            self.shutdown()

    def shutdown(self) -> None:
        """Begin (or go on with) the graceful close in the module docstring.
        A session whose handshake has not chosen HTTP/3 has no control stream
        for a GOAWAY: it closes once no request is in progress."""
        if self.gone or self.closed:
            return
        if not self.handshake_done:
            # No request can have come yet (they need the 1-RTT keys the
            # client's Finished brings; zion takes no 0-RTT), so nothing to
            # finish: refused at once. Left to handshake_timeout, a client
            # that sent one Initial held the worker's drain (a stop, a
            # reload) for 10 s. A real client told CONNECTION_REFUSED tries
            # again, on the next worker or over TCP.
            self.closed = True
            self.link.refuse()
            return
        if not self.closing:
            self.closing = True
            if self.h3 is not None:
                self._goaway(_GOAWAY_ALL)
        self._step()

    def _step(self) -> None:
        if self.gone or self.closed:
            return
        if self.h3 is None:
            if not self.streams and self._answers_delivered():
                self.close()
            return
        seen = self._goaway_acknowledged() or self.loop.time() - self.goaway_at >= _GOAWAY_WAIT
        if self.refuse_from is None:
            if seen:
                # Every stream the client opened so far is taken (RFC 9000
                # 2.1: opening one opens all lower ones); it sent them before
                # it acknowledged the first GOAWAY.
                self.refuse_from = self.quic._local_max_streams_bidi.used * 4
                self._goaway(self.refuse_from)
            return
        if seen and not self.streams and self._answers_delivered():
            self.close()

    def _goaway(self, stream_id: int) -> None:
        self.quic.send_stream_data(self.h3._local_control_stream_id,
                                   encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id)))
        self.goaway_at = self.loop.time()
        self.link.transmit_soon()

    def _goaway_acknowledged(self) -> bool:
        # The control stream never ends: all of it acknowledged is an empty
        # send buffer (aioquic drops acknowledged bytes from its front).
        control = self.quic._streams.get(self.h3._local_control_stream_id)
        return control is None or not control.sender._buffer

    def _reject(self, sid: int) -> None:
        """RFC 9114 5.2: a request on a stream at or past our GOAWAY's ID was
        not processed; H3_REQUEST_REJECTED tells the client it may retry it."""
        if sid in self.rejected:
            return
        self.rejected.add(sid)
        with contextlib.suppress(Exception):
            self.quic.reset_stream(sid, ErrorCode.H3_REQUEST_REJECTED)
            self.quic.stop_stream(sid, ErrorCode.H3_REQUEST_REJECTED)
        self.link.transmit_soon()

    def _answers_delivered(self) -> bool:
        # Client-initiated bidirectional streams (RFC 9000 2.1: id % 4 == 0)
        # below the GOAWAY's ID (the ones past it were refused); our control
        # and QPACK streams never finish.
        limit = self.refuse_from if self.refuse_from is not None else _GOAWAY_ALL
        return all(stream.sender.is_finished for sid, stream in self.quic._streams.items()
                   if sid % 4 == 0 and sid < limit)

    def close(self) -> None:
        if self.gone or self.closed:
            return
        self.closed = True
        self.quic.close(error_code=ErrorCode.H3_NO_ERROR)
        self.link.transmit_soon()
