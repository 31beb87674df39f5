"""HTTP/2 connections (ALPN "h2" over TLS, h2c prior knowledge): the
connection's rules here; each stream carries an Exchange (h2_stream.py).

Frames and HPACK come from `zttp` (sans-I/O, Zig core): bench/h2_codec.py
measured ~2 µs of server CPU per small request against ~85 µs for the pure
Python `h2`, which would make HTTP/2 many times dearer than HTTP/1.1.

What zttp decides and what zion adds:
- zttp refuses streams past its 128 concurrent (REFUSED_STREAM), bounds a
  header block (CONTINUATION flood, CVE-2024-27316) and detects some floods
  of its own. Its limits are fixed (0.0.35 has no way to set them,
  Kludex/zttp#49): a connection's 4096th stream or 257th reset is a fatal
  ENHANCE_YOUR_CALM, whatever the rate. zion does not let a client see it:
  well before either, the connection is handed to a fresh zttp codec on the
  same TCP/TLS connection (zttp_shim.seeded_connection; the streams of the
  old codec finish on it meanwhile, the new streams' frames wait), so a
  client may send any number of requests on one connection. Where a GOAWAY
  is unavoidable (drain, reload, a hand-over that cannot finish) it is the
  graceful two-step one of RFC 9113 6.8: last-stream-id 2^31-1 and a PING,
  then the real last stream id once the PING comes back, so every request
  the client sent before it saw the first GOAWAY is answered.
- Receive flow control is zion's. zttp credits the windows as it parses
  (WINDOW_UPDATE for every ~32 KiB it surfaces), so an app that does not read
  could only be bounded by not reading the socket - which stalls every other
  stream. zion takes zttp's WINDOW_UPDATE frames out of what it sends, keeps
  their increments (they count the frames' full length, padding included) and
  gives back to a stream only what its app has read: a stream's unread body
  (a WebSocket's undecoded input) is bounded by limits.h2_stream_window, a
  connection's by h2_max_streams of those. The connection's window is given
  back as the bytes arrive: withheld for unread bytes too, four streams
  whose apps do not read (4 x 256 KiB) shut the 1 MiB connection window and
  stalled every other stream. The worker bounds the sum: each connection
  adds its unread total to state.unread_body, and past
  limits.unread_body_per_worker a connection withholds its connection
  window for its own unread bytes again (its client, not the worker's
  memory, waits; connections with nothing unread go on), so a worker holds
  at most the budget plus h2_connection_window per connection. A peer that
  sends past a window it was given is reset (stream) or sent GOAWAY
  (connection): FLOW_CONTROL_ERROR, RFC 9113 6.9.1. zttp itself never
  notices: it refills its own windows after every frame.
- zion counts, per connection and second, peer RST_STREAMs (rapid reset,
  CVE-2023-44487), SETTINGS and PINGs (zttp answers each itself); past
  limits.h2_flood_per_second of any: GOAWAY ENHANCE_YOUR_CALM and close. It
  refuses streams past limits.h2_max_streams, answers 431 past
  max_header_size / max_headers, resets a stream whose client leaves its
  window shut for send_timeout (zero-window stall), and PINGs a silent
  connection with streams open, closing it if nothing comes back. A
  CONTINUATION flood is zttp's: it sends GOAWAY ENHANCE_YOUR_CALM after 16
  CONTINUATION frames or ~64 KiB of header block, as long as it is asked for
  events after every read (it is, here).
- zion rewrites the values of zttp's SETTINGS preface (same frame, same
  ids): MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE and INITIAL_WINDOW_SIZE
  from our limits, ENABLE_CONNECT_PROTOCOL (RFC 8441) when WebSockets are
  on. HEADER_TABLE_SIZE stays zttp's 4096: a client's HPACK encoder then
  indexes the fields it repeats (:authority, user-agent, cookies), and
  zttp decodes an index instead of Huffman-coded literals (about 19k of
  ~158k instructions per request when the table was 0). A fresh codec's
  decoder starts with an empty table, so before a hand-over zion sends
  SETTINGS HEADER_TABLE_SIZE 0 and hands over only once the client has
  acknowledged it (RFC 7541 4.2: its encoder has emptied its table), then
  gives the 4096 back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from zion.http import forwarded, hpack, rules, zttp_shim
from zion.http.connection import endpoints
from zion.http.exchange import Exchange
from zion.http.files import PATHSEND
from zion.http.flow_control import FlowControl, PauseReason, ReadPauses
from zion.http.h2_stream import H2Stream
from zion.http.h2_tunnel import StreamTransport
from zion.http.tls_scope import tls_extension
from zion.http.zttp_shim import H2ErrorCode
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import Extensions, HTTPScope
    from zion.http.h1 import H2cRequest
    from zion.http.state import ServerState
    from zion.http.websocket import Budget

log = get_logger("zion.http")

# zttp 0.0.35 calls a codec's 4096th stream, or its 257th reset (its own and
# the peer's, however slowly they came; browsers cancel streams as pages
# change), a flood: GOAWAY ENHANCE_YOUR_CALM, and the streams in flight are
# lost. Past the RECYCLE counts the connection moves to a fresh codec (see
# the module docstring); the hard counts, which a hand-over keeps the old
# codec from reaching, end the connection at once should one come anyway.
# The margins cover what a client may open or reset before the hand-over
# starts holding its new streams (h2_max_streams <= 128).
_STREAMS_RECYCLE, _STREAMS_PER_CONNECTION = 3000, 4096 - 2 * 128 - 16
_RESETS_RECYCLE, _RESETS_PER_CONNECTION = 64, 256 - 128 - 16
# Request body bytes read and dropped after a complete answer (a 413) before
# the stream is reset instead (see stream_done).
_DISCARD = 1 << 20
# The idle deadline once the last stream ended: set at the next sweep
# (check_deadline), as h1.py's _DONE; the sweep runs on a fixed beat, so an
# idle connection still ends between keepalive_timeout and one beat past it.
_IDLE_FROM_SWEEP = -1.0
# New streams' frames held during a hand-over before reading pauses.
_HELD_HIGH = 65536
_WRITE_FULL, _HANDOVER = int(PauseReason.WRITE_BUFFER_FULL), int(PauseReason.HANDOVER)
# The 8 bytes of our PINGs: a liveness probe, and the graceful GOAWAY's.
_PING_ALIVE, _PING_GOAWAY = b"zionping", b"zionbye!"
# The request fields _request looks at (one set lookup for the common field
# that is none of them); forwarding fields only matter from a trusted proxy.
_LOOKED_AT = frozenset({b"cookie", b"content-length", b"expect"}) | forwarded.FIELDS
# The scope's method for the common ones without a decode call.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                    "OPTIONS", "CONNECT")}
# zttp's event types as module names: one lookup each in _events' dispatch.
_NeedData, _Data, _Request, _EndOfMessage = (zttp_shim.NeedData, zttp_shim.Data,
                                             zttp_shim.Request, zttp_shim.EndOfMessage)


class H2Protocol(asyncio.Protocol):
    __slots__ = (
        "state", "loop", "limits", "transport", "conn", "flow", "client", "server",
        "streams", "closing", "goaway", "last_stream", "flush_pending", "deadline",
        "window_start", "resets", "settings", "pings", "accepted", "resets_total",
        "date_prefix", "date_pairs", "date_pairs_own", "tls", "max_streams",
        "max_header_list", "proxied", "stream_window", "conn_window", "received",
        "conn_earned", "conn_credited", "strip_updates", "credit_due", "heard", "heard_at",
        "ping_deadline", "retiring", "unflushed", "since_yield", "write_blocked_at",
        "pauses", "router", "recycle_due", "handover_at", "peer_settings", "recycled",
        "goaway_sent_at", "overloaded", "self_dependent", "frames", "upgrade", "scope_base",
        "preface_due", "settings_sent", "table_wait", "encoder", "out", "ws_budget",
        "unread", "withheld_at",
    )

    def __init__(self, state: ServerState, upgrade: H2cRequest | None = None) -> None:
        """`upgrade`: the HTTP/1.1 request of an `Upgrade: h2c`, our stream 1."""
        self.state = state
        self.upgrade = upgrade
        self.preface_due = False  # zttp's SETTINGS of an upgraded connection: not yet out
        self.loop = state.loop
        self.limits = limits = state.limits
        self.transport: Any = None
        self.conn = zttp_shim.new_connection()
        self.flow = FlowControl(self.loop)
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closing = False
        self.goaway = False
        self.last_stream = 0
        self.accepted = 0  # streams answered on this connection
        self.flush_pending = False
        self.deadline = 0.0  # idle deadline while no stream is open; 0 = none (_IDLE_FROM_SWEEP)
        self.window_start = 0.0
        self.resets = self.settings = self.pings = 0
        self.resets_total = 0
        self.retiring = False  # GOAWAY at the next moment no stream is open
        self.date_prefix = b""
        self.date_pairs: list[tuple[bytes, bytes]] = []
        self.date_pairs_own: list[tuple[bytes, bytes]] = []
        self.tls: dict[str, Any] | None = None  # the ASGI TLS extension, with client certs
        self.proxied = False  # the peer may speak for its clients (forwarded headers)
        self.max_streams = limits.h2_max_streams
        self.max_header_list = limits.max_header_size
        # Receive flow control (see the module docstring): the windows we
        # advertise, body bytes received, credit zttp earned and we gave back.
        self.stream_window = limits.h2_stream_window
        self.conn_window = limits.h2_connection_window
        self.received = 0
        self.conn_earned = 0
        self.conn_credited = 0
        # Body bytes its apps have not read, as of the last _credit: this
        # connection's share of state.unread_body.
        self.unread = 0
        # The last tick that saw zion withhold the connection's window from
        # the client (_body_timeouts): its bodies' deadlines wait with it.
        self.withheld_at = 0.0
        self.ws_budget: Budget | None = None  # its WebSockets' (h2_tunnel.py)
        self.strip_updates = False  # zttp may have queued WINDOW_UPDATEs
        self.credit_due = False  # an app read: work out the credit at the next flush
        # Liveness: a byte came since the last tick; the tick that saw the
        # last one (the worker's tick is twice a second: no clock read per
        # read); when an unanswered PING expires.
        self.heard = False
        self.heard_at = 0.0
        self.ping_deadline = 0.0
        # Send back-pressure: body bytes queued in zttp since the last flush;
        # bytes the transport took since a writer last yielded to the loop;
        # since when the client has not taken our bytes (send_timeout).
        self.unflushed = 0
        self.since_yield = 0
        self.write_blocked_at = 0.0
        self.pauses = ReadPauses()
        # Codec hand-over (module docstring): due at the next read's end; the
        # router while the old codec finishes; since when; the client's
        # SETTINGS, replayed to the fresh codec; how many hand-overs so far.
        self.router: zttp_shim.FrameRouter | None = None
        self.recycle_due = False
        self.handover_at = 0.0
        self.peer_settings: dict[int, int] = {}
        self.recycled = 0
        # The graceful GOAWAY's first step (2^31-1 + PING) went out at; 0 = not yet.
        self.goaway_sent_at = 0.0
        self.overloaded = False  # opened past max_connections: its requests get 503
        # Streams whose HEADERS or PRIORITY named themselves as their parent.
        self.self_dependent: set[int] = set()
        self.frames = zttp_shim.FrameScan()
        # SETTINGS frames we sent (zttp's preface, then our own); the ACK count
        # at which our HEADER_TABLE_SIZE 0 is in force, 0 = none asked for.
        self.settings_sent = 1
        self.table_wait = 0
        # Response header blocks (hpack.py), and the frames they went into:
        # sent before what zttp queued after them (_take).
        self.encoder = hpack.Encoder()
        self.out: list[bytes] = []
        self.scope_base: HTTPScope | None = None  # rules.http_scope_base, at the first request

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: Any = transport
        self.transport = tr
        tr.set_write_buffer_limits(high=self.limits.write_buffer_high)
        self.client, self.server = endpoints(transport)
        self.state.connection_opened(self)
        self.overloaded = rules.over_connections(self.state)
        if self.state.client_certs:
            self.tls = tls_extension(transport.get_extra_info("ssl_object"))
        self.proxied = self.state.speaks_for_clients(self.client)
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.heard_at = self.loop.time()
        self.pauses.transport = tr
        if self.upgrade is not None:
            method, target, headers, settings = self.upgrade
            self.upgrade = None
            # zttp sends its SETTINGS once the client's preface came: _send
            # makes them ours then.
            self.conn.initiate_upgrade_connection(method, target, headers, settings)
            self.preface_due = True
            return
        self.conn.initiate_connection()
        tr.write(self._preface(self.conn.data_to_send()))

    def _preface(self, data: bytes) -> bytes:
        """zttp's SETTINGS frame (first in `data`) with our values."""
        preface = zttp_shim.rewrite_settings(data, {
            zttp_shim.MAX_CONCURRENT_STREAMS: self.max_streams,
            zttp_shim.MAX_HEADER_LIST_SIZE: self.max_header_list,
            zttp_shim.INITIAL_WINDOW_SIZE: self.stream_window,
            # RFC 8441 3: a client may open WebSockets as streams.
            zttp_shim.ENABLE_CONNECT_PROTOCOL: int(self.state.websocket_enabled),
        })
        if self.conn_window > zttp_shim.DEFAULT_WINDOW:
            # The connection window has no SETTINGS of its own (RFC 9113 6.9.2).
            preface += zttp_shim.window_update(0, self.conn_window - zttp_shim.DEFAULT_WINDOW)
        return preface

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.state.connection_closed(self)
        self.state.unread_body -= self.unread  # its buffers go with it
        self.unread = 0
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()
        self.flow.connection_lost()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        # The client does not take what we send: stop reading too, so it
        # cannot go on opening streams whose answers pile up (a whole answer
        # sent in one send() never waits in drain()).
        self.flow.pause_writing()
        self.write_blocked_at = self.loop.time()
        self.pauses.pause(_WRITE_FULL)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.write_blocked_at = 0.0
        self.pauses.resume(_WRITE_FULL)
        for stream in list(self.streams.values()):
            if stream.tunnel is not None:
                stream.tunnel.window_opened()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.heard = True
        frames = self.frames
        size = len(data)
        # The common read, one whole frame that is neither PRIORITY (2) nor
        # SETTINGS (4) nor HEADERS (1) with the PRIORITY flag, has nothing for
        # the scan to find: tested here, without its call (~2.8k instructions).
        if (size < 9 or data[0] or data[1] << 8 | data[2] != size - 9
                or frames.skip or frames.partial):
            scan = True
        else:
            kind = data[3]
            if kind == 1 and data[4] & 0x25 == 5 and self.router is None:
                # HEADERS with END_STREAM and END_HEADERS (0x1 | 0x4), no
                # PRIORITY (0x20): a whole request in one frame.
                self._one_request(data)
                return
            scan = kind == 2 or kind == 4 or (kind == 1 and data[4] & 0x20 != 0)
        if scan:
            found = frames.scan(data)
            if found:
                self.self_dependent.update(found)
            if self.table_wait and frames.acks >= self.table_wait:
                # The client's HPACK table is empty now: hand over after this read.
                self.table_wait = 0
                self.recycle_due = True
        router = self.router
        if router is not None:
            data = router.split(data)  # newer streams' frames wait for the fresh codec
            if len(router.held) > _HELD_HIGH:
                self.pauses.pause(_HANDOVER)
        self._feed(data)

    def _one_request(self, data: bytes) -> None:
        """data_received's commonest read: one whole HEADERS frame that ends
        its request. zttp had nothing left over (every read before this one
        was parsed to NeedData or was one of these, parsed whole), so once
        the frame's Request came, zttp has parsed all of it: no event can
        follow, and the call that would only say NeedData (~0.8k
        instructions) is not made. Nor is what follows a read in _feed: such
        a frame makes zttp queue nothing (what _request itself queues, it
        sends), and it holds no self-dependency, no SETTINGS ACK, nothing for
        a hand-over."""
        try:
            self.conn.receive_data(data)
            event = self.conn.next_event()
            if type(event) is _Request:
                self._request(event)  # type: ignore[arg-type]
                return
            self._events(event)  # trailers, a refusal: the ordinary way
        except zttp_shim.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        self._after_read()

    def _feed(self, data: bytes) -> None:
        """Bytes for the codec (scanned and routed already)."""
        conn = self.conn
        try:
            conn.receive_data(data)
            self._events(conn.next_event())
        except zttp_shim.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        self._after_read()

    def _protocol_error(self, exc: zttp_shim.RemoteProtocolError) -> None:
        # zttp has queued the GOAWAY that says why (ENHANCE_YOUR_CALM
        # for its floods and oversized header blocks).
        log.info("h2_protocol_error", client=self.client[0] if self.client else None,
                 error=str(exc))
        self._flush(final=True)
        self.close()

    def _after_read(self) -> None:
        if self.self_dependent:
            for sid in [s for s in self.self_dependent if s in self.streams]:
                self.self_dependent.discard(sid)
                self.reset(self.streams[sid], H2ErrorCode.PROTOCOL_ERROR)  # RFC 9113 5.3.1
            if self.self_dependent:
                # Streams not open: closed ones need nothing; an idle one would
                # have to be remembered until it opens, and a client can name
                # any number of them (+34 MiB for 500k PRIORITY frames). A
                # stream error may be a connection error (RFC 9113 5.4.1).
                # Stream 0: PRIORITY on the connection (RFC 9113 6.3).
                fatal = 0 in self.self_dependent or max(self.self_dependent) > self.last_stream
                self.self_dependent.clear()
                if fatal:
                    self.fail_connection(H2ErrorCode.PROTOCOL_ERROR,
                                         "PRIORITY on stream 0 or a stream that depends on itself")
                    return
        # What zttp queued (SETTINGS and PING ACKs, resets); most reads queue nothing.
        data = self._take() if self.out else self.conn.data_to_send()
        if data or self.strip_updates or self.credit_due:
            self._send(data)
        if self.recycle_due:
            self._start_handover()
        elif self.router is not None:
            self._maybe_hand_over()

    def _events(self, event: Any) -> None:
        """`event` and the ones after it, until zttp needs data."""
        conn = self.conn
        streams = self.streams
        while True:
            kind = type(event)
            if kind is _NeedData:
                return
            if kind is _Data:
                if self._data(event):  # type: ignore[arg-type]
                    return
            elif kind is _Request:
                self._request(event)  # type: ignore[arg-type]
                if self.closing:  # a flood, or the last stream of a retired connection
                    return
            elif kind is _EndOfMessage:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream.client_ended = True
                    if stream.exchange is not None:
                        stream.exchange.message_complete()
                    elif stream.tunnel is not None:
                        stream.tunnel.feed_eof()
                    elif stream.ended:  # answered; the unwanted body is over
                        self._discarded(stream)
            elif kind is zttp_shim.WindowUpdate:
                sid = event.stream_id  # type: ignore[union-attr]
                for stream in (list(streams.values()) if sid == 0 else
                               filter(None, (streams.get(sid),))):
                    stream.window_opened()
            elif kind is zttp_shim.RstStream:
                stream = streams.pop(event.stream_id, None)  # type: ignore[union-attr]
                if stream is not None:
                    stream.lost()
                    self.credit_later()  # its unread body no longer holds the window
                if self._flood("resets"):
                    return
                self.resets_total += 1
                if self.resets_total >= _RESETS_RECYCLE:
                    self._recycle(self.resets_total >= _RESETS_PER_CONNECTION)
            elif kind is zttp_shim.Settings:
                params = event.params  # type: ignore[union-attr]
                self.peer_settings.update(params)
                for key, value in params:
                    if key == zttp_shim.HEADER_TABLE_SIZE:
                        self.encoder.resize(value)  # the client's decoder table
                for stream in streams.values():
                    stream.window_opened()  # INITIAL_WINDOW_SIZE may have grown
                if self._flood("settings"):
                    return
            elif kind is zttp_shim.Ping:
                if not event.ack:  # type: ignore[union-attr]
                    if self._flood("pings"):
                        return
                elif event.data == _PING_GOAWAY:  # type: ignore[union-attr]
                    self._final_goaway()
                    if self.closing:
                        return
            elif kind is zttp_shim.GoAway:
                self.goaway = True
                if not streams:
                    self.close()
                    return
            elif kind is zttp_shim.ConnectionClosed:
                self.close()
                return
            event = conn.next_event()

    def _flood(self, kind: str) -> bool:
        now = self.loop.time()
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.resets = self.settings = self.pings = 0
        count = getattr(self, kind) + 1
        setattr(self, kind, count)
        if count > self.limits.h2_flood_per_second:
            self.calm(f"more than {self.limits.h2_flood_per_second} {kind} a second")
            return True
        return False

    def calm(self, why: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM, then close: the peer is attacking."""
        log.warning("h2_flood", client=self.client[0] if self.client else None, reason=why)
        with contextlib.suppress(zttp_shim.ProtocolError):
            self.conn.close(H2ErrorCode.ENHANCE_YOUR_CALM, self.last_stream)
        self._flush(final=True)
        self.close()

    # -- requests ---------------------------------------------------------------

    def _request(self, event: zttp_shim.Request) -> None:
        sid = event.stream_id
        if self.goaway or self.closing:
            # Above the last stream id of our GOAWAY: the client knows it was
            # not processed and sends it again elsewhere (RFC 9113 6.8). No
            # RST_STREAM on top (curl 7.88 then fails some of those requests
            # instead of retrying them). Counted with the resets: a client
            # that goes on opening streams after our GOAWAY is flooding us.
            self._flood("resets")
            return
        self.last_stream = sid  # zttp checks that stream ids only grow (RFC 9113 5.1.1)
        if len(self.streams) >= self.max_streams:
            self.conn.stream(sid).reset(H2ErrorCode.REFUSED_STREAM)
            self.wrote()  # not sent by the read's end when _one_request read it
            self._flood("resets")  # past the limit we advertised: flooding us
            return
        self.deadline = 0.0
        self.accepted += 1
        stream = H2Stream(self, sid)
        headers = event.headers
        if type(headers) is not list:
            headers = list(headers)
        size = 32 * len(headers)  # RFC 9113 6.5.2's header list size: 32 a field,
        cookies = 0
        expect_100 = forwarding = False
        length: bytes | None = None
        for name, value in headers:
            size += len(name) + len(value)  # and its name and value
            if name in _LOOKED_AT:
                if name == b"cookie":
                    cookies += 1
                elif name == b"content-length":
                    length = value
                elif name == b"expect":
                    # zttp's expect_continue is for HTTP/1.1 only. The 100 goes
                    # out at once: the body is what the app will read anyway.
                    expect_100 = value.lower() == b"100-continue"
                else:
                    forwarding = True
        if cookies > 1:
            # RFC 9113 8.2.3: crumbs may arrive as separate fields; frameworks
            # read one cookie header, so they are joined as HTTP/1.1 sends them.
            joined = b"; ".join(v for n, v in headers if n == b"cookie")
            headers = [(n, v) for n, v in headers if n != b"cookie"]
            headers.append((b"cookie", joined))
        end_stream = event.end_stream
        protocol = event.protocol
        method = event.method
        raw_path = event.path
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            path = ""
        if "%" in path:
            path = urllib.parse.unquote(path)
        extensions: Extensions = {"http.response.trailers": {}}
        if self.tls is not None:
            extensions["tls"] = self.tls
        # rules.http_scope, from this connection's copy of it (made at the
        # first request: connection_start may set the client after
        # connection_made) with the keys of a request set: a dict copy, not a
        # 14-key display and an 11-argument call (test_h2 holds them equal).
        base = self.scope_base
        if base is None:
            base = self.scope_base = rules.http_scope_base(self.state, self.client, self.server)
            base["http_version"] = "2"
        scope = base.copy()
        scope["method"] = _METHODS.get(method) or method.decode("ascii", "replace")
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = event.query
        scope["headers"] = headers
        scope["state"] = self.state.lifespan_state.copy()
        scope["extensions"] = extensions
        if self.proxied and forwarding:
            assert self.state.proxies is not None
            forwarded.apply(scope, self.state.proxies)
        self.streams[sid] = stream
        too_large = size > self.max_header_list or len(headers) > self.limits.max_headers
        if (protocol is not None and protocol == b"websocket" and method == b"CONNECT" and path
                and not too_large and not end_stream
                and self.state.websocket_factory is not None):
            self._websocket(stream, scope, event.target, headers)
            return
        extensions[PATHSEND] = {}  # not a WebSocket's (above)
        # time.monotonic(), not loop.time(), for started_at: the same clock, but
        # uvloop's is libuv's cached millisecond (see h1.py).
        ex = stream.exchange = Exchange(stream, scope, True, False, time.monotonic())
        if end_stream:
            stream.client_ended = True
            ex.message_complete()
        else:
            stream.body_deadline = rules.body_deadline(self.limits, self.loop.time())
        # rules.head_refusal is None for a head that is not overloaded, declares
        # no length and has an origin-form target (nearly every request): not
        # called then (~0.2k instructions a request; test_rules holds it).
        refusal = (rules.head_refusal(self.state, self.overloaded, length, raw_path, method)
                   if self.overloaded or length is not None or raw_path[:1] != b"/" else None)
        if too_large:
            ex.fail(431, "header section too large")
        elif not path:
            ex.fail(400, "non-ASCII request target")
        elif refusal is not None:
            self.refuse(stream, ex, refusal)
        elif protocol is not None:
            ex.fail(501, f"extended CONNECT for {protocol!r} is not supported")
        elif sid in self.self_dependent:
            self.self_dependent.discard(sid)
            self.reset(stream, H2ErrorCode.PROTOCOL_ERROR)  # RFC 9113 5.3.1
        else:
            if expect_100 and not end_stream:
                stream.handle.send_informational(100)
            self.state.dispatch(ex)
        if self.accepted >= _STREAMS_RECYCLE:
            self._recycle(self.accepted >= _STREAMS_PER_CONNECTION)

    def _websocket(self, stream: H2Stream, scope: HTTPScope, target: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
        """RFC 8441: this stream is a WebSocket from here on."""
        factory = self.state.websocket_factory
        assert factory is not None
        tunnel = stream.tunnel = StreamTransport(self, stream)
        # None: no HTTP/1.1 handshake to replay; the WebSocket layer answers
        # through tunnel.respond() (version-aware, RFC 8441 5).
        tunnel.start(factory(scope, target, headers, None))

    def tunnel_done(self, stream: H2Stream) -> None:
        """The WebSocket on this stream is over: end our side, drop the stream."""
        stream.end()
        if self.streams.pop(stream.stream_id, None) is not None and not stream.client_ended:
            with contextlib.suppress(zttp_shim.LocalProtocolError):
                stream.handle.reset(H2ErrorCode.NO_ERROR)
        stream.closed = True
        self._stream_gone(stream)

    def _data(self, event: zttp_shim.Data) -> bool:
        """Request body bytes: check them against the windows we gave, then
        hand them to the stream's exchange. True: the connection is done."""
        data = event.data
        size = len(data)
        self.received += size
        self.strip_updates = True
        if self.received > self.conn_window + self.conn_credited:
            self.fail_connection(H2ErrorCode.FLOW_CONTROL_ERROR, "sent past the connection window")
            return True
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return False
        stream.received += size
        ex = stream.exchange
        if ex is None and stream.tunnel is None:
            if stream.received > stream.discard_until:
                self._discarded(stream, reset=True)
            return False
        if stream.received > self.stream_window + stream.credited:
            log.info("h2_flow_control_error", client=self.client[0] if self.client else None,
                     stream=stream.stream_id)
            self.reset(stream, H2ErrorCode.FLOW_CONTROL_ERROR)
        elif stream.tunnel is not None:
            stream.tunnel.feed(data)
        elif ex is not None and not ex.response_complete:
            refusal = rules.body_chunk(self.limits, ex.received, size)
            if refusal is not None:
                self.refuse(stream, ex, refusal)
            else:
                ex.feed_body(data)
                stream.body_deadline = rules.body_deadline(self.limits, self.loop.time())
        return False

    def refuse(self, stream: H2Stream, ex: Exchange, refusal: rules.Refusal) -> None:
        rules.refuse(ex, refusal, lambda: self.reset(stream, H2ErrorCode.CANCEL))

    def stream_done(self, stream: H2Stream, ex: Exchange) -> None:
        rules.request_done(self.state, ex)
        if not stream.ended:
            stream.end()
        if not ex.body_complete and not stream.closed and stream.stream_id in self.streams:
            # RFC 9113 8.1: the answer is complete, the rest of the request is
            # not wanted. It is read and dropped (up to _DISCARD more bytes,
            # within body_timeout) rather than reset at once: curl 7.88 takes
            # a RST_STREAM during its upload as a failure and never shows the
            # answer it has (a 413 included).
            stream.exchange = None
            if self.goaway:  # leaving: not waited for (_final_goaway)
                self._discarded(stream, reset=True)
                return
            stream.discard_until = stream.received + _DISCARD
            stream.body_deadline = rules.body_deadline(self.limits, self.loop.time())
            self.credit_later()  # what the app left unread is the client's again
            return
        self.streams.pop(stream.stream_id, None)
        stream.closed = True
        # The exchange refers to its stream (ex.conn): without this reference
        # back, the request's objects (exchange, scope, Task) are freed at
        # once, not by the next cyclic collection (~13 objects a request;
        # 12.8k of 138k instructions per request went to collecting them).
        stream.exchange = None
        self._stream_gone(stream)

    def _discarded(self, stream: H2Stream, reset: bool = False) -> None:
        """The request body after a complete answer is over (or too long)."""
        if self.streams.pop(stream.stream_id, None) is not None and reset:
            with contextlib.suppress(zttp_shim.LocalProtocolError):
                stream.handle.reset(H2ErrorCode.NO_ERROR)
        stream.closed = True
        self._stream_gone(stream)

    def _stream_gone(self, stream: H2Stream) -> None:
        if stream.received:
            self.credit_due = True  # what the app left unread is given back, below
        if self.streams:
            self.wrote()  # with the other streams' answers, at the end of this iteration
        else:
            self._flush()  # at once: no other stream's answer to wait for
            if self.goaway or self.retiring or self.state.draining:
                self.shutdown()
            else:
                self.deadline = _IDLE_FROM_SWEEP  # no clock read per request
                if self.router is not None:
                    # Not from inside _events(), which holds the old codec.
                    self.loop.call_soon(self._maybe_hand_over)

    def reset(self, stream: H2Stream, code: H2ErrorCode) -> None:
        if stream.closed:
            return
        if self.streams.pop(stream.stream_id, None) is not None:
            with contextlib.suppress(zttp_shim.LocalProtocolError):
                stream.handle.reset(code)
            self.wrote()
        stream.lost()
        if stream.received:
            self.credit_later()

    # -- output ---------------------------------------------------------------

    def default_headers(self, own_server: bool) -> list[tuple[bytes, bytes]]:
        """server, date and the operator's --header ones, as the worker's
        tick keeps them (DateCache.pairs)."""
        date = self.state.date
        if date.prefix is not self.date_prefix:
            self.date_prefix = date.prefix
            self.date_pairs = date.pairs
            self.date_pairs_own = date.pairs_without_server
        # Not a copy: callers only extend their own lists with it.
        return self.date_pairs_own if own_server else self.date_pairs

    def wrote(self) -> None:
        """Frames were queued: send them once this loop iteration is over,
        so many streams' answers leave in one TLS write."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self, final: bool = False) -> None:
        """Send what zttp queued; `final`: it ends with a fatal GOAWAY, after
        which nothing may follow."""
        self.flush_pending = False
        self.unflushed = 0
        data = self._take()
        # _send()'s common case inline (a request's answer): one Python call
        # less per request.
        if self.preface_due or self.strip_updates or self.credit_due:
            self._send(data, final)
        elif data:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self.since_yield += len(data)
                transport.write(data)

    def flush_now(self) -> None:
        """A writer's drain(): what zttp holds goes to the transport now (the
        flush already scheduled, if any, then finds little or nothing)."""
        self.unflushed = 0
        self._send(self._take())

    def _take(self) -> bytes:
        """Our own frames (h2_stream: response heads), then what zttp queued
        since: every time one is added, zttp's queue goes before it."""
        data = self.conn.data_to_send()
        out = self.out
        if out:
            if len(out) == 1:  # the common case: one response of ours
                data = out[0] + data if data else out[0]
            else:
                if data:
                    out.append(data)
                data = b"".join(out)
            out.clear()
        return data

    def _send(self, data: bytes, final: bool = False) -> None:
        if self.preface_due and data:
            self.preface_due = False
            data = self._preface(data)
        if self.strip_updates:
            # Only after request body bytes can zttp have queued a WINDOW_UPDATE.
            self.strip_updates = False
            if data:
                data = self._take_window_updates(data)
        if self.credit_due and not final:
            self.credit_due = False
            data += self._credit()
        if data and self.transport is not None and not self.transport.is_closing():
            self.since_yield += len(data)
            self.transport.write(data)

    def credit_later(self) -> None:
        self.credit_due = True
        self.wrote()

    def _take_window_updates(self, data: bytes) -> bytes:
        """Remove zttp's WINDOW_UPDATE frames from `data`, keeping what they
        credit as earned: given back by _credit() once the app has read."""
        data, taken = zttp_shim.take_window_updates(data)
        streams = self.streams
        for sid, increment in taken:
            if sid == 0:
                self.conn_earned += increment
            else:
                stream = streams.get(sid)
                if stream is not None:
                    stream.earned += increment
            self.credit_due = True
        return data

    def _credit(self) -> bytes:
        """WINDOW_UPDATEs for what zttp earned: a stream's less what its app
        has not yet read, so an app that does not read holds its own
        stream's window shut and nobody else's. The connection's in full
        while the worker's connections hold less than
        limits.unread_body_per_worker unread, since the stream windows
        already bound what each holds: withheld for unread bytes too, the
        unread bytes of h2_connection_window / h2_stream_window (4) such
        streams shut it, and every other stream stalled with them. Past
        it, withheld for this connection's own unread bytes: the clients
        that fill apps which do not read wait, not the worker's memory
        (h2_max_streams x h2_stream_window a connection, 25 MiB, times
        every client). Also where this connection's unread total is
        brought up to date in state.unread_body: it changes only when body
        arrives (zttp then earns credit, and this runs), an app reads (if
        it is owed window: resume_reading; else the count stays high, on
        the safe side, until the next credit or the stream goes) or a
        stream goes (_stream_gone, reset)."""
        frames = []
        unread_total = 0
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None:
                unread = ex.body_size
            elif stream.tunnel is not None and stream.tunnel.read_paused:
                # A WebSocket whose app is not receiving: hold all it was sent.
                unread = max(0, stream.received - stream.credited)
            else:
                unread = 0
            unread_total += unread
            if stream.client_ended:
                continue
            due = stream.earned - unread - stream.credited
            if due > 0:
                stream.credited += due
                frames.append(zttp_shim.window_update(stream.stream_id, due))
        due = (self.conn_earned - self.conn_credited
               - rules.unread_withheld(self.state, self.unread, unread_total))
        self.unread = unread_total
        if due > 0:
            self.conn_credited += due
            frames.append(zttp_shim.window_update(0, due))
        return b"".join(frames)

    # -- connection control -----------------------------------------------------

    def check_deadline(self, now: float) -> None:
        if self.closing:
            return
        if self.goaway_sent_at and not self.goaway and (
                now - self.goaway_sent_at >= self.limits.h2_ping_timeout):
            self._final_goaway()  # the PING never came back: end it anyway
            if self.closing:
                return
        if self.router is not None and now - self.handover_at >= self.limits.keepalive_timeout:
            # The old codec's streams do not end (a WebSocket, a stream whose
            # window stays shut): give up the hand-over, end gracefully; the
            # held streams are above our last stream id, so the client knows
            # they were not processed and sends them again.
            log.info("h2_handover_gave_up", client=self.client[0] if self.client else None,
                     streams=len(self.streams))
            self.retire(True)
        if self.write_blocked_at and now - self.write_blocked_at > self.limits.send_timeout:
            # It never reads: close() would wait to flush for ever.
            log.info("h2_send_timeout", client=self.client[0] if self.client else None)
            self.abort()
            return
        if not self.streams:
            deadline = self.deadline
            if deadline == _IDLE_FROM_SWEEP:  # a stream ended since the last sweep
                self.deadline = now + self.limits.keepalive_timeout
            elif deadline and now >= deadline:
                self.shutdown()
            return
        if self.conn_earned > self.conn_credited and not rules.over_unread_budget(self.state):
            # Window withheld while the worker was past its budget, which
            # other connections' reads, resets or closes brought it under.
            self.credit_later()
        self._body_timeouts(now)
        if self.heard:
            self.heard = False
            self.heard_at = now
            self.ping_deadline = 0.0
        interval = self.limits.h2_ping_interval
        if self.ping_deadline:
            if now >= self.ping_deadline:
                # Nothing at all from the client for interval + timeout while
                # its streams wait: a dead peer (no RST, no FIN) holds them.
                log.info("h2_ping_timeout", client=self.client[0] if self.client else None,
                         streams=len(self.streams))
                self.close()
        elif interval and now - self.heard_at >= interval:
            self.ping_deadline = now + self.limits.h2_ping_timeout
            # zttp has no call that sends a PING: one 17-byte frame (RFC 9113 6.7).
            if self.transport is not None:
                self.transport.write(zttp_shim.ping(_PING_ALIVE))

    # -- codec hand-over (module docstring) --------------------------------------

    def _recycle(self, hard: bool) -> None:
        """The codec nears zttp's lifetime caps: ask the client to empty its
        HPACK table, and hand over once it has; at the hard cap (a hand-over
        did not hold them off), end."""
        if hard:
            self.retire(True)
        elif (self.router is None and not self.table_wait and not self.recycle_due
              and not self.goaway and not self.goaway_sent_at):
            self._table_size(0)
            self.table_wait = self.settings_sent

    def _table_size(self, size: int) -> None:
        """Our own SETTINGS HEADER_TABLE_SIZE (module docstring); zttp's
        decoder takes any size up to its 4096 either way."""
        self.settings_sent += 1
        if self.transport is not None:
            self.transport.write(zttp_shim.settings({zttp_shim.HEADER_TABLE_SIZE: size}))

    def _start_handover(self) -> None:
        """From now on the old codec sees only the connection's frames and
        its own streams'; newer streams wait for the fresh codec."""
        self.recycle_due = False
        if self.closing or self.goaway or self.goaway_sent_at:
            return
        self.router = zttp_shim.FrameRouter(self.last_stream)
        self.handover_at = self.loop.time()
        self._maybe_hand_over()

    def _maybe_hand_over(self) -> None:
        """Once the old codec has nothing left to send or receive, a fresh
        one takes the connection and is fed what was held for it."""
        router = self.router
        conn = self.conn
        if (router is None or self.streams or self.closing or conn.has_pending_send()
                or conn.send_window < 0):
            return
        self._flush()
        self.router = None
        self.conn = zttp_shim.seeded_connection(self.peer_settings, conn.send_window,
                                                router.boundary)
        self.accepted = self.resets_total = 0
        self.recycled += 1
        self._table_size(zttp_shim.DEFAULT_HEADER_TABLE)  # the client may index again
        self.pauses.resume(_HANDOVER)
        held = router.rest()
        if held and not self.closing:
            self._feed(held)  # scanned when they came

    # -- ending -------------------------------------------------------------------

    def _body_timeouts(self, now: float) -> None:
        """body_timeout per stream, as HTTP/1.1 has it per connection: a
        request body that stops arriving is answered 408 (reset if the app
        has begun answering). Not while the app holds unread body, nor while
        zion withholds the connection's window (the worker past its unread
        budget, _credit): then the wait is the app's or the worker's, not
        the client's."""
        if self.conn_earned > self.conn_credited and (
                self.conn_window + self.conn_credited - self.received < rules.WINDOW_SHUT):
            self.withheld_at = now
        for stream in list(self.streams.values()):
            ex = stream.exchange
            if stream.client_ended or not stream.body_deadline or now < stream.body_deadline:
                continue
            if ex is None:
                if stream.tunnel is None:
                    self._discarded(stream, reset=True)  # answered; the body stopped
                continue
            stream.body_deadline = rules.body_wait(self.limits, ex, now, self.withheld_at)
            if not stream.body_deadline:
                self.refuse(stream, ex, rules.BODY_TIMED_OUT)

    def retire(self, now: bool) -> None:
        """End this connection gracefully: at once, or once no stream is open."""
        if now or not self.streams:
            self.shutdown()
        else:
            self.retiring = True

    def shutdown(self) -> None:
        """Drain: the graceful GOAWAY of RFC 9113 6.8. First last-stream-id
        2^31-1 and a PING: streams the client sends before it reads that are
        still served; when the PING comes back (or h2_ping_timeout passes)
        the real last stream id. The streams in flight finish, then the
        connection closes."""
        if self.closing:
            return
        if self.goaway:  # ours is final (or the client's came): close once idle
            if not self.streams:
                self.close()
            return
        if not self.goaway_sent_at:
            self.goaway_sent_at = self.loop.time()
            self.recycle_due = False
            self._flush()
            if self.transport is not None:
                self.transport.write(zttp_shim.goaway(zttp_shim.MAX_STREAM_ID)
                                     + zttp_shim.ping(_PING_GOAWAY))

    def _final_goaway(self) -> None:
        """The second step: the last stream we answer; later ones the client
        may send again elsewhere."""
        if self.goaway or self.closing:
            return
        if not self.goaway_sent_at:
            self.goaway_sent_at = self.loop.time()
        self.goaway = True
        if self.router is not None:
            # Streams held for a fresh codec are above last_stream: never
            # processed, and the client knows it (RFC 9113 6.8).
            self.router = None
            self.pauses.resume(_HANDOVER)
        with contextlib.suppress(zttp_shim.ProtocolError):
            self.conn.close(H2ErrorCode.NO_ERROR, self.last_stream)
        self._flush()
        for stream in [s for s in self.streams.values() if s.exchange is None and s.tunnel is None]:
            # Answered; only the unwanted rest of its body is awaited (stream_done).
            # Leaving, we wait no longer: RST_STREAM NO_ERROR (RFC 9113 8.1), or
            # a client that stops sending holds the drain for body_timeout.
            self._discarded(stream, reset=True)
        if not self.streams:
            # A TLS close: close_notify, then uvloop reads (and drops) what the
            # client still sends until its own close_notify - no reset for
            # the requests it sent before it read our GOAWAY, which it sends
            # again on a new connection (curl retries them all this way).
            self.close()

    def fail_connection(self, code: H2ErrorCode, why: str) -> None:
        """A connection error (RFC 9113 5.4.1): GOAWAY with its code, then close."""
        log.info("h2_connection_error", client=self.client[0] if self.client else None,
                 code=code.name, reason=why)
        with contextlib.suppress(zttp_shim.ProtocolError):
            self.conn.close(code, self.last_stream)
        self._flush(final=True)
        self.close()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.state.connection_closed(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            self.state.connection_closed(self)
            if self.transport is not None:
                self.transport.abort()

