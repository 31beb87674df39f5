"""HTTP/1.1 connection protocol over httptools (llhttp).

Connection state (transport, timers, pipeline) is kept apart from request
state (Exchange). Limits are enforced while parsing: a request line over
limits.max_request_line gets 414, header sections over max_header_size or
max_headers get 431, bodies over max_body_size 413, a header section not
complete within header_timeout 408, anything unparsable 400 - each followed
by closing the connection. Nothing a client sends can raise out of here.

Timeouts are not one TimerHandle per request: each connection keeps a
deadline and the worker's tick sweeps them, which keeps timer churn off the
per-request path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from zion.http import forwarded, response, rules
from zion.http.connection import endpoints
from zion.http.exchange import Exchange, ProtocolError
from zion.http.files import PATHSEND
from zion.http.flow_control import FlowControl, PauseReason, ReadPauses
from zion.http.state import count_response
from zion.http.tls_scope import tls_extension
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import Extensions, HTTPScope
    from zion.http.state import ServerState

log = get_logger("zion.http")

# Why reading is paused (flow_control.py), as plain ints for the hot path.
_WRITE_FULL = int(PauseReason.WRITE_BUFFER_FULL)
_BODY_UNREAD = int(PauseReason.BODY_UNREAD)
_PIPELINED = int(PauseReason.PIPELINED)
_LAST = int(PauseReason.LAST_REQUEST)
# Deadline kinds. The last two are set by the parser's callbacks and armed
# (given a time) at the end of the read (data_received): a request whose head
# and body come in one read, as most do, never needs a clock for them.
# _DONE likewise: a response ended, and the next sweep (check_deadline)
# starts the idle (keep-alive) deadline; the sweep runs on a fixed beat, so
# a connection still closes between keepalive_timeout and one beat past it.
_NONE, _FIRST, _IDLE, _DONE, _HEADERS, _BODY, _HEAD_BEGUN = 0, 1, 2, 3, 4, 5, 6
# How long a draining worker keeps a connection whose last response promised
# keep-alive. A client that reuses it sends its next request at once, and that
# request may already be on the wire when the drain starts: closing then loses
# it (the client sees the connection end without an answer and cannot know
# whether the request ran). Within this grace it is answered with
# `connection: close`; past it, the close races only a client that waited
# exactly this long, as at any keep-alive timeout. Capped by keepalive_timeout.
_DRAIN_GRACE = 1.0


class _NoCallbacks:
    """What a closed connection's parser calls back: nothing."""


_IDLE_PARSER = httptools.HttpRequestParser(_NoCallbacks())
# Fields llhttp reads connection options from (keep-alive, close, upgrade).
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection"})
# Request fields on_header acts on; any other field is only kept.
_LOOKED_AT = frozenset({b"expect", b"upgrade", b"content-length", *_CONNECTION_FIELDS,
                        *forwarded.FIELDS})
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SWITCHING_TO_H2C = (b"HTTP/1.1 101 Switching Protocols\r\n"
                     b"connection: Upgrade\r\nupgrade: h2c\r\n\r\n")
# What an `upgrade` header asks for.
_NO_UPGRADE, _WEBSOCKET, _H2C = 0, 1, 2
# An upgraded request's fields that are HTTP/1.1's own (RFC 9113 8.2.2).
_NOT_OVER_H2 = frozenset({b"connection", b"upgrade", b"http2-settings", b"keep-alive",
                          b"proxy-connection", b"transfer-encoding", b"te"})
# An `Upgrade: h2c` request for HTTP/2: method, target, headers, HTTP2-Settings.
H2cRequest = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]
# Hands the transport to HTTP/2 for it: (state, request, transport, bytes
# after the request, client, proxied); connection_start.upgrade_to_h2.
H2cUpgrade = Callable[["ServerState", H2cRequest, Any, bytes, "tuple[str, int] | None", bool],
                      None]
_STATUS_LINES = response.STATUS_LINES
# The scope's method for the common ones, without decoding the parser's bytes.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
# One (name, value) pair as a field line, without a Python frame per field.
_FIELD_LINE = b"%s: %s\r\n".__mod__
# Field lines already made and checked, by their (name, value) pair: an app
# sends the same few pairs (content-type, its own fixed fields) over and over,
# and a lookup costs a fraction of formatting and checking the line again
# (about 1.2k instructions a field). Bounded in entries and line length; when
# full it starts over, so what an app sends now is what stays cached.
_LINES: dict[tuple[bytes, bytes], bytes] = {}
_LINES_MAX, _LINE_MAX = 512, 256
# "content-length: N\r\n" by N, the same way (formatting one is ~1k).
_LENGTH_LINES: dict[int, bytes] = {}
# A request target's (path, raw_path, query_string) by its bytes, the same
# way: clients ask for the same few targets again and again, and splitting,
# decoding and unquoting one costs ~1.5k instructions. A hostile client's
# distinct targets only make it start over more often.
_TARGETS: dict[bytes, tuple[str, bytes, bytes]] = {}
_TARGETS_MAX, _TARGET_MAX = 512, 256


class _Reject(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


class H1Protocol(asyncio.Protocol):
    __slots__ = (
        # connection
        "state", "loop", "limits", "transport", "flow", "parser", "client", "server",
        "scope_base",
        "pauses", "closing", "deadline", "deadline_kind", "current", "pipeline",
        "overloaded", "upgrade_seen", "start_now",
        # request being parsed
        "url", "headers", "header_bytes", "header_raw", "in_headers", "began_in_chunk",
        "parsing", "expect_100", "content_length", "upgrade", "forwarding", "ws_pending",
        "connection_options", "trailer",
        "to_h2",
        "h2c_pending", "upgrade_body",
        "last_request", "held_for_drain", "write_blocked_at", "proxied",
        # response being written
        "chunked",
    )
    # Made in connection_made (ConnectionStart picked HTTP/1.1 by then).
    parser: httptools.HttpRequestParser

    def __init__(self, state: ServerState, to_h2: H2cUpgrade | None = None) -> None:
        """`to_h2`: makes the HTTP/2 protocol an `Upgrade: h2c` request switches
        to (connection_start.py; None: such requests are served as HTTP/1.1)."""
        # connection state
        self.state = state
        self.loop = state.loop
        self.limits = state.limits
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl(self.loop)
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.pauses = ReadPauses()  # one flag per reason; reading resumes when none is left
        self.closing = False
        self.deadline = 0.0
        self.deadline_kind = _NONE
        self.current: Exchange | None = None  # the one being answered
        self.pipeline: deque[Exchange] = deque()  # parsed, waiting their turn
        self.overloaded = False
        self.upgrade_seen = False
        # connection.Carrier: the first request's Task runs its first step
        # inside dispatch (task_start: dispatch ends data_received, re-entry
        # is safe), so a new TLS connection's session tickets and its first
        # response leave in one write. Later ones start with create_task:
        # there are no tickets to join, and task_start's own work (a context
        # copy, a call_soon shim) costs a keep-alive request more than the
        # loop turn it saves (one real TLS worker: 104.4k -> 99.0k
        # instructions per keep-alive request, bench/conn_instructions.py).
        self.start_now = True
        # request being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.header_raw = 0
        self.in_headers = False
        self.began_in_chunk = False
        self.parsing: Exchange | None = None
        self.expect_100 = False
        self.content_length = 0
        self.upgrade = _NO_UPGRADE  # what this request's `upgrade` asks for
        self.forwarding = False  # it has a field forwarded.apply reads
        self.connection_options = False  # it has a connection (or proxy-connection) field
        self.trailer = False  # its chunked body ended with trailer fields
        self.to_h2 = to_h2
        # rules.http_scope_base for this connection's requests, made at the
        # first: connection_start.py may set `client` after connection_made.
        self.scope_base: HTTPScope | None = None
        self.h2c_pending: H2cRequest | None = None  # an Upgrade: h2c request, until the switch
        self.upgrade_body = 0  # body bytes of an unswitched upgrade request still to come
        self.ws_pending: HTTPScope | None = None  # its scope, until the switch
        self.last_request = False  # a request without keep-alive was parsed
        self.held_for_drain = False  # a pipelined request waits for the write buffer
        self.write_blocked_at = 0.0  # since when the client has not taken our bytes
        self.proxied = False  # the peer may speak for its clients (forwarded headers)
        # response being written (one at a time: the current exchange's)
        self.chunked = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass.
        tr: Any = transport
        self.transport = tr
        self.pauses.transport = tr
        self.parser = httptools.HttpRequestParser(self)
        tr.set_write_buffer_limits(high=self.limits.write_buffer_high)
        self.client, self.server = endpoints(transport)
        state = self.state
        self.proxied = state.speaks_for_clients(self.client)
        state.connection_opened(self)
        self.overloaded = rules.over_connections(state)
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_kind = _FIRST

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:  # the client's close: close() has not counted it
            self.closing = True
            self.state.connection_closed(self)
        if self.current is not None:
            self.current.lost()
        for ex in self.pipeline:
            ex.lost()
        self.flow.connection_lost()
        self.deadline_kind = _NONE
        self.parser = _IDLE_PARSER  # _release_parser, without its call

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        # A client that sends requests but does not read the answers: stop
        # reading too, so neither its requests nor our responses pile up.
        self.flow.pause_writing()
        self.write_blocked_at = self.loop.time()
        self._pause(_WRITE_FULL)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.write_blocked_at = 0.0
        self._resume(_WRITE_FULL)
        if self.held_for_drain:
            self.held_for_drain = False
            self.start_next()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.upgrade_body:
            self._upgrade_body(data)
            return
        self.began_in_chunk = False
        was_in_headers = self.in_headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.ws_pending is not None:
                self._switch_to_websocket(data[exc.args[0]:] if exc.args else b"")
                return
            if self.h2c_pending is not None:
                self._switch_to_h2(data[exc.args[0]:] if exc.args else b"")
                return
            # Other upgrades (h2c we may not switch, unknown protocols) are served as plain
            # HTTP/1.1 and never switched; the parser stops at the upgrade
            # point, so the connection closes after the answer.
            self.upgrade_seen = True
            if self.parsing is not None:
                self.parsing.keep_alive = False
            for ex in self.pipeline:
                ex.keep_alive = False
            if self.upgrade_body:
                self._upgrade_body(data[exc.args[0]:] if exc.args else b"")
                return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Reject):
                self.reject(cause.status, cause.detail)
            else:
                log.error("parser_callback_error", error=repr(cause))
                self.reject(500, "")
            return
        except httptools.HttpParserError as exc:
            if not self.last_request:
                self.reject(400, _parser_detail(exc))
                return
            # Bytes after a request that ends the connection (Connection:
            # close, HTTP/1.0): answer the request, ignore the rest, as
            # nginx and uvicorn do.
            self._pause(_LAST)
        if self.in_headers:
            # httptools buffers a partial header line itself and reports it
            # only once complete, so bound the raw bytes of an unfinished
            # header section here (one read of slack when it began mid-chunk).
            if was_in_headers and not self.began_in_chunk:
                self.header_raw += len(data)
            if self.header_raw > self.limits.max_header_size + self.limits.max_request_line:
                self.reject(431, "header section too large")
                return
        if self.deadline_kind >= _BODY:  # a body still to come, or a head begun
            self._arm_deadline()
        if self.current is None and self.pipeline:
            self.start_next()

    def _arm_deadline(self) -> None:
        """At the end of a read that left a body to come (each such read sets
        it again) or began a head (timed from that read, not its last: a
        slow head must not keep extending it)."""
        if self.deadline_kind == _BODY:
            self.deadline = rules.body_deadline(self.limits, self.loop.time())
        else:
            self.deadline = self.loop.time() + self.limits.header_timeout
            self.deadline_kind = _HEADERS

    # -- httptools callbacks ---------------------------------------------------

    # No on_message_begin: httptools calls back only what the protocol has,
    # and a request's first span is its target (llhttp refuses a request line
    # without one), so the request begins at its first on_url: one call from
    # C into Python fewer per request. The header deadline then starts at the
    # target's first bytes rather than the method's; before them the idle
    # (keep-alive) or first-request deadline still holds, and llhttp refuses
    # a method longer than its longest known one.

    def on_url(self, url: bytes) -> None:
        if self.in_headers:  # the target, split over reads
            url = self.url + url
        else:  # a new request
            self.headers = []
            self.header_bytes = 0
            self.header_raw = 0
            self.in_headers = True
            self.began_in_chunk = True
            self.expect_100 = False
            self.content_length = 0
            self.upgrade = _NO_UPGRADE
            self.forwarding = False
            self.connection_options = False
            self.deadline_kind = _HEAD_BEGUN  # timed at the end of this read
        self.url = url
        if len(url) > self.limits.max_request_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.header_bytes + len(name) + len(value) + 4
        self.header_bytes = size
        # The size bounds the fields kept (each counts at least 4 bytes); their
        # number is checked once, when the section is complete.
        if size > self.limits.max_header_size:
            raise _Reject(431, "header section too large")
        if not self.in_headers:
            # A chunked body's trailer section (RFC 9112 7.1.2), which llhttp
            # reports as fields: ASGI has no request trailers, and they must
            # not join the header section (RFC 9110 6.5.1) — the app's
            # scope["headers"] would grow fields the client sent after the
            # body (x-forwarded-for, authorization), and a trailer named
            # content-length or connection would change this request's state.
            # Counted against max_header_size above, then dropped.
            self.trailer = True
            return
        name = name.lower()
        if name in _LOOKED_AT:  # one set lookup for the common field that is none of them
            self._look_at(name, value)
        self.headers.append((name, value))

    def _look_at(self, name: bytes, value: bytes) -> None:
        if name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100 = True
        elif name == b"upgrade":
            kind = value.lower()
            if kind == b"websocket":
                self.upgrade = _WEBSOCKET
            elif kind == b"h2c":
                self.upgrade = _H2C
        elif name == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                raise _Reject(400, "bad content-length") from None
        elif name in _CONNECTION_FIELDS:
            self.connection_options = True
        else:  # forwarded.FIELDS: worth reading only from a peer we trust
            self.forwarding = True

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.deadline_kind = _NONE
        if len(self.headers) > self.limits.max_headers:
            raise _Reject(431, "too many header fields")
        if self.content_length:  # 413 before the body is read
            refusal = rules.body_chunk(self.limits, 0, self.content_length)
            if refusal is not None:
                raise _Reject(refusal.status, refusal.detail)
        parser = self.parser
        target = _TARGETS.get(self.url)
        path, raw_path, query = _split_target(self.url) if target is None else target
        state = self.state
        upgrade = self.upgrade
        ws = upgrade == _WEBSOCKET and state.websocket_enabled and parser.should_upgrade()
        # A WebSocket has no HTTP response to send a file as.
        extensions: Extensions = {} if ws else {PATHSEND: {}}
        if state.client_certs and (tls := self._tls_extension()) is not None:
            extensions["tls"] = tls
        keep_alive = parser.should_keep_alive()
        # llhttp keeps a connection alive without a connection option only
        # for HTTP/1.1 (RFC 9112 9.3; 1.0 and 0.9 close, and it refuses any
        # other 1.x): then the version is known without get_http_version,
        # which formats it with str.format (~2.5k instructions a request).
        version = ("1.1" if keep_alive and not self.connection_options
                   else parser.get_http_version())
        # rules.http_scope, from this connection's copy of it: the keys a
        # request sets, set (test_h1 holds the two equal).
        base = self.scope_base
        if base is None:
            base = self.scope_base = rules.http_scope_base(state, self.client, self.server)
        scope = base.copy()
        if version != "1.1":
            scope["http_version"] = version
        method = parser.get_method()
        scope["method"] = _METHODS.get(method) or method.decode("ascii")
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["headers"] = self.headers
        scope["state"] = state.lifespan_state.copy()
        scope["extensions"] = extensions
        if self.proxied and self.forwarding:
            assert state.proxies is not None
            forwarded.apply(scope, state.proxies)
        if upgrade:
            if ws:
                # The switch happens when the parser stops at the upgrade point
                # (HttpParserUpgrade in data_received); no HTTP exchange for it.
                self.ws_pending = scope
                return
            if upgrade == _H2C and self.to_h2 is not None:
                request = self._h2c_request(parser)
                if request is not None:
                    # Switched when the parser stops at the upgrade point; the
                    # request becomes HTTP/2's stream 1.
                    self.h2c_pending = request
                    return
        # time.monotonic(), not loop.time(): the same clock (CLOCK_MONOTONIC), but
        # uvloop's is libuv's cached millisecond, and a request takes microseconds.
        ex = Exchange(self, scope, keep_alive, self.expect_100,
                      time.monotonic() if state.access_log else 0.0)  # only logged
        self.parsing = ex
        self.pipeline.append(ex)
        if upgrade and self.content_length and parser.should_upgrade():
            # httptools skips the body of an upgrade request (it expects the
            # new protocol's bytes): an upgrade we do not take gets it here.
            self.upgrade_body = self.content_length
        # Until on_message_complete (at once, for a request without a body);
        # timed at the end of the read if the body is still to come.
        self.deadline_kind = _BODY
        if self.current is not None or len(self.pipeline) > 1:
            # Pipelined: hold further input until earlier answers are out.
            self._pause(_PIPELINED)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        refusal = rules.body_chunk(self.limits, ex.received, len(body))
        if refusal is not None:
            raise _Reject(refusal.status, refusal.detail)
        if not ex.response_complete:
            ex.feed_body(body)

    def on_message_complete(self) -> None:
        if self.upgrade_body:
            return  # not before the body (_upgrade_body)
        ex = self.parsing
        self.parsing = None
        if self.deadline_kind == _BODY:
            self.deadline_kind = _NONE
        if self.trailer:
            self.trailer = False
            # llhttp acts on a trailer `connection: close` as on a header's: it
            # refuses every byte after this message ("Data after Connection:
            # close"), so the next request on a connection our answer kept
            # alive would get a 400. Honour it: the answer closes instead.
            if ex is not None and not self.parser.should_keep_alive():
                ex.keep_alive = False
        if ex is not None:
            if not ex.keep_alive:
                self.last_request = True
            ex.message_complete()

    # -- request dispatch -----------------------------------------------------

    def start_next(self) -> None:
        if self.current is not None or not self.pipeline or self.closing:
            return
        ex = self.current = self.pipeline.popleft()
        # Only an overloaded connection's requests are refused by load: the
        # others skip the call (rules.admit_request says so), ~0.5k a request.
        if self.overloaded and (refusal := rules.admit_request(self.state, True)) is not None:
            ex.fail(refusal.status, refusal.detail, refusal.headers)
        else:
            self.state.dispatch(ex)
        self.start_now = False

    def exchange_done(self, exchange: Exchange) -> None:
        state = self.state
        rules.request_done(state, exchange)
        if self.current is exchange:
            self.current = None
        if not exchange.keep_alive or self.upgrade_seen or not exchange.body_complete:
            # A body the app never read would have to be drained first; closing
            # is cheaper and keeps the next request's framing unambiguous.
            self.close()
            return
        if self.pipeline:
            if self.flow.write_paused:
                self.held_for_drain = True  # resume_writing starts it
            else:
                self.loop.call_soon(self.start_next)
            return
        if not self.in_headers:
            # Idle from the next sweep, without a clock now. A next head that
            # arrived before this answer ended keeps its header deadline.
            self.deadline_kind = _DONE
        if state.draining:
            # The drain began after this response's head promised keep-alive.
            self._drain_grace()
        # Nothing waits now; a body the app left unread belonged to that exchange.
        if self.pauses.reasons:
            self._resume(_PIPELINED | _BODY_UNREAD)

    def _tls_extension(self) -> dict[str, Any] | None:
        assert self.transport is not None
        return tls_extension(self.transport.get_extra_info("ssl_object"))

    def _upgrade_body(self, data: bytes) -> None:
        """The body of an upgrade request served as HTTP/1.1, past the
        parser; what follows it is dropped (the connection closes after the
        answer, as for any unswitched upgrade)."""
        chunk = data[:self.upgrade_body]
        self.upgrade_body -= len(chunk)
        try:
            if chunk:
                self.on_body(chunk)
            if not self.upgrade_body:
                self.on_message_complete()
        except _Reject as exc:
            self.upgrade_body = 0
            self.reject(exc.status, exc.detail)
            return
        if self.deadline_kind == _BODY:
            self._arm_deadline()
        if self.current is None and self.pipeline:
            self.start_next()

    def _h2c_request(self, parser: httptools.HttpRequestParser) -> H2cRequest | None:
        """An `Upgrade: h2c` request HTTP/2 can answer as its stream 1 (RFC
        7540 3.2; RFC 9113 3.1 deprecates it, but curl --http2 sends it on
        http://), or None: it is served as HTTP/1.1. Not with a body (it
        would have to be read before the switch), and only with exactly one
        well-formed HTTP2-Settings (base64url of 6-byte settings)."""
        if not parser.should_upgrade() or self.content_length:
            return None
        settings = [v for n, v in self.headers if n == b"http2-settings"]
        if len(settings) != 1 or any(n == b"transfer-encoding" for n, _ in self.headers):
            return None
        try:
            raw = base64.urlsafe_b64decode(settings[0] + b"=" * (-len(settings[0]) % 4))
        except (ValueError, binascii.Error):
            return None
        if len(raw) % 6:
            return None
        headers = [(n, v) for n, v in self.headers if n not in _NOT_OVER_H2]
        return parser.get_method(), self.url, headers, settings[0]

    def _switch_to_h2(self, trailing: bytes) -> None:
        """101, then the transport goes to HTTP/2 (connection_start.py), which
        answers the upgraded request on stream 1 once the client's preface
        comes (RFC 7540 3.2). This object is done once it returns."""
        request, self.h2c_pending = self.h2c_pending, None
        assert request is not None and self.transport is not None and self.to_h2 is not None
        if self.current is not None or self.pipeline:
            self.reject(400, "h2c upgrade pipelined behind another request")
            return
        transport = self.transport
        transport.write(_SWITCHING_TO_H2C)
        self.closing = True  # nothing of ours runs on this transport any more
        self.deadline_kind = _NONE
        self.state.connection_handed_over(self)
        self._release_parser()
        if self.pauses.reasons:
            transport.resume_reading()
        self.to_h2(self.state, request, transport, trailing, self.client, self.proxied)

    def _release_parser(self) -> None:
        """This connection is done with HTTP/1.1 (closed, or handed over).
        The parser holds us as its callbacks: that cycle kept every closed
        connection, with its TLS transport and buffers, until a full cyclic
        collection (1,000 closed connections: +166 MiB with the collector
        off). Nothing feeds it any more (data_received returns once closing)."""
        self.parser = _IDLE_PARSER

    def _switch_to_websocket(self, trailing: bytes) -> None:
        """Hand the transport to the WebSocket protocol, as uvicorn does with
        transport.set_protocol: this object is done once it returns."""
        scope, self.ws_pending = self.ws_pending, None
        factory = self.state.websocket_factory
        assert scope is not None and self.transport is not None and factory is not None
        if self.current is not None or self.pipeline:
            self.reject(400, "websocket upgrade pipelined behind another request")
            return
        self.closing = True  # nothing of ours runs on this transport any more
        self.deadline_kind = _NONE
        self.state.connection_closed(self)
        self._release_parser()
        ws = factory(scope, self.url, self.headers, trailing)
        self.transport.set_protocol(ws)
        ws.connection_made(self.transport)
        if self.pauses.reasons:
            self.transport.resume_reading()

    # -- the current exchange's response, framed (connection.Carrier) ------------

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]],
                       length: int | None, body: bytes, end: bool, own_server: bool) -> None:
        ex = self.current  # answers go out one at a time, in request order
        date = self.state.date
        parts = [_STATUS_LINES.get(status) or response.status_line(status),
                 date.without_server if own_server else date.prefix]
        lines = _LINES
        for pair in headers:
            try:
                line = lines.get(pair)
            except TypeError:  # a bytearray name or value: not cached
                line = None
            parts.append(_field_line(pair) if line is None else line)
        chunked = False
        if length is not None:
            line = _LENGTH_LINES.get(length)
            if line is None:
                line = _LENGTH_LINES[length] = b"content-length: %d\r\n" % length
                if len(_LENGTH_LINES) > _LINES_MAX:
                    _LENGTH_LINES.clear()
            parts.append(line)
        elif status in _NO_BODY_STATUS or status < 200:
            pass
        elif ex is not None and ex.scope["http_version"] == "1.1":
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ex is not None:
            ex.keep_alive = False  # HTTP/1.0 without a length: close-delimited
        self.chunked = chunked
        if ex is None or not ex.keep_alive or self.state.draining:
            if ex is not None:
                ex.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if chunked:
            if body:
                parts += (b"%x\r\n" % len(body), body, b"\r\n")
            if end:
                parts.append(b"0\r\n\r\n")
        elif body:
            parts.append(body)
        transport = self.transport  # self.write, without its call
        if not self.closing and transport is not None:
            transport.write(b"".join(parts))

    def send_body(self, data: bytes, end: bool) -> None:
        if self.chunked:
            if data:
                self.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if end else
                           b"%x\r\n%b\r\n" % (len(data), data))
            elif end:
                self.write(b"0\r\n\r\n")
        elif data:
            self.write(data)

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        # Only chunked coding can carry trailer fields (RFC 9112 7.1.2); a
        # response with a length drops them, as the ASGI spec allows.
        if self.chunked:
            for name, value in headers:
                if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                    raise ProtocolError(f"invalid response trailer {name!r}")
            self.write(b"0\r\n" + response.header_lines(headers) + b"\r\n")

    def send_continue(self) -> None:
        self.write(_CONTINUE)

    # -- connection control ---------------------------------------------------

    def reject(self, status: int, detail: str) -> None:
        """Refuse the request being parsed and close the connection."""
        if self.current is None or not self.current.response_started:
            self.write(response.error(status, self.state.date, detail))
            count_response(self.state.counters, status)
        for ex in (self.current, *self.pipeline):
            if ex is not None:
                ex.lost()
        self.close()

    def check_deadline(self, now: float) -> None:
        if self.closing:
            return
        if self.write_blocked_at and now - self.write_blocked_at > self.limits.send_timeout:
            self.abort()  # it never reads: close() would wait to flush forever
            return
        kind = self.deadline_kind
        if kind == _DONE:  # a response ended since the last sweep
            self.deadline = now + self.limits.keepalive_timeout
            self.deadline_kind = _IDLE
            return
        if kind == _NONE or now < self.deadline:
            return
        if kind == _HEADERS:
            self.reject(408, "header section not received in time")
        elif kind == _BODY:
            if self.pauses.reasons:
                # We stopped reading (the app is slow to take the body, or
                # requests are pipelined): not the client's delay.
                self.deadline = now + self.limits.body_timeout
                return
            self.reject(rules.BODY_TIMED_OUT.status, rules.BODY_TIMED_OUT.detail)
        else:
            self.close()  # idle keep-alive, or a connection that never spoke

    def shutdown(self) -> None:
        """Drain: finish what is in flight, then close.

        Every response from now on says `connection: close` (state.draining).
        An idle keep-alive connection closes after _DRAIN_GRACE, not now: the
        client may be sending on it this instant. A new one that has not sent
        its first request yet keeps its header deadline: its request is on
        the way, and it is answered."""
        if self.deadline_kind in (_IDLE, _DONE):
            self._drain_grace()

    def _drain_grace(self) -> None:
        now = self.loop.time()
        if self.deadline_kind == _DONE:
            self.deadline = now + self.limits.keepalive_timeout
            self.deadline_kind = _IDLE
        self.deadline = min(self.deadline, now + _DRAIN_GRACE)

    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        await self.flow.drain()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline_kind = _NONE
            # Stops counting now, not when TLS shutdown ends (up to
            # ssl_shutdown_timeout later): max_connections and the demux's
            # load see only connections that can still be served.
            self.state.connection_closed(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline_kind = _NONE
            self.state.connection_closed(self)
            if self.transport is not None:
                self.transport.abort()

    def pause_reading(self) -> None:
        """The exchange's: the app has not taken the body buffered for it."""
        self._pause(_BODY_UNREAD)

    def resume_reading(self) -> None:
        # On every body the app takes: test the flag before any call.
        if self.pauses.reasons & _BODY_UNREAD:
            self._resume(_BODY_UNREAD)

    def _pause(self, reason: int) -> None:
        if not self.closing:
            self.pauses.pause(reason)

    def _resume(self, reason: int) -> None:
        if not self.closing:
            self.pauses.resume(reason)


def _field_line(pair: tuple[bytes, bytes]) -> bytes:
    """One response field as its line, checked, and cached if short."""
    line = _FIELD_LINE(pair)
    # A CR or LF in a name or value would end the field early: response
    # splitting. bytes.splitlines breaks at CR, LF and CRLF only, so any CR
    # or LF besides the line's own CRLF makes one line more.
    if len(line.splitlines()) != 1:
        raise ProtocolError(f"invalid response header {pair[0]!r}")
    if len(line) <= _LINE_MAX and type(pair[0]) is bytes and type(pair[1]) is bytes:
        if len(_LINES) >= _LINES_MAX:
            _LINES.clear()
        _LINES[pair] = line
    return line


def _split_target(url: bytes) -> tuple[str, bytes, bytes]:
    """A request target as the scope's path, raw_path and query_string
    (cached if short), or _Reject."""
    # find, not `in`: bytes.__contains__ tries the needle as an int first
    # and clears the TypeError (about 2k instructions).
    if url[:1] == b"/" and url.find(b"#") < 0:
        # Origin-form: llhttp has already refused every byte parse_url
        # would (controls, DEL, non-ASCII), so it would split it the same.
        raw_path, _, query = url.partition(b"?")
    else:
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "invalid request target") from None
        raw_path = parsed.path or b"/"
        query = parsed.query or b""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise _Reject(400, "non-ASCII request target") from None
    if "%" in path:
        path = urllib.parse.unquote(path)
    target = path, raw_path, query
    if len(url) <= _TARGET_MAX:
        if len(_TARGETS) >= _TARGETS_MAX:
            _TARGETS.clear()
        _TARGETS[url] = target
    return target


def _parser_detail(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 120 else text[:117] + "..."
