"""WebSocket (RFC 6455) with the ASGI `websocket` scope.

Framing, the opening handshake, permessage-deflate and close-handshake rules
come from the `websockets` library's sans-I/O `ServerProtocol` (uvicorn's
default since 0.50); this module moves bytes between it and the transport and
messages between it and the app. The HTTP/1.1 protocol hands the transport
over with `transport.set_protocol` once the parser stops at the upgrade point.

Back-pressure both ways, bounded by the server, never by the client:

- Reading stops, for one of three reasons each with its own flag (`paused`),
  and resumes only when no reason is left: the app has not taken
  `websocket.max_queue_bytes` of decoded messages (or `max_queue` of them);
  the transport stopped taking our writes (pongs and close replies would
  otherwise pile up behind a client that sends and never reads); or this
  loop turn's decoding budget is spent.
- The library decodes (and inflates, RFC 7692) all it is given in one call,
  so it is given one frame at a time (RFC 6455 5.2 gives each frame's length
  in its first 2-14 bytes): a pause takes effect at the next frame, and
  bytes not decoded yet wait here, undecoded. Nothing decoded is dropped.
- An app's send() waits while the transport's write buffer is above its
  high-water mark, at most `limits.send_timeout`: then the connection is
  aborted.

Per connection that bounds decoded input at max_queue_bytes + max_size (the
frame that crossed the line), plus one read of raw bytes.

Over HTTP/2 (RFC 8441) one connection carries many WebSockets, so their
decoded bytes share one `Budget` of max_queue_bytes (the carrier hands it
out as the transport's extra info "websocket_budget"): past it every
WebSocket of the connection stops decoding (a fourth reason) until the apps
have taken the total down to half. One WebSocket at a time whose app waits
in receive() with nothing queued may still decode its next message (the budget's
`owner`): its app would otherwise wait for ever on a partial message that
the budget holds back. That bounds the connection at max_queue_bytes + 2 x
max_size (the frame that crossed the line, and the owner's message).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from zion.http import response
from zion.http.connection import ClientDisconnected
from zion.http.exchange import ProtocolError
from zion.http.flow_control import FlowControl
from zion.http.wakeup import Wakeup
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import (
        HTTPScope,
        WebSocketAcceptEvent,
        WebSocketCloseEvent,
        WebSocketConnectEvent,
        WebSocketEvent,
        WebSocketReceiveEvent,
        WebSocketResponseBodyEvent,
        WebSocketResponseStartEvent,
        WebSocketScope,
        WebSocketSendEvent,
        WebSocketSendMessage,
    )
    from zion.http.state import ASGIApp, ServerState

log = get_logger("zion.websocket")

# websockets logs every open and close at INFO through stdlib logging; zion
# has its own access and error lines.
_LIB_LOG = logging.getLogger("zion.websocket.sansio")
_LIB_LOG.setLevel(logging.WARNING)

_ABNORMAL = 1006
_GOING_AWAY = 1001
_INTERNAL_ERROR = 1011
_INVALID_DATA = 1007
# How long a close handshake we started may take before the socket is closed.
_CLOSE_TIMEOUT = 5.0

_CONNECTING, _OPEN, _HTTP_DENIAL, _DONE = 0, 1, 2, 3

# Never in an HTTP/2 answer from the app's headers: connection-specific (RFC
# 9113 8.2.2), or the handshake's own, or the stream's to add.
_H2_NOT_FORWARDED = frozenset({
    b"connection", b"upgrade", b"keep-alive", b"transfer-encoding", b"proxy-connection",
    b"te", b"content-length", b"date", b"server", b"sec-websocket-accept",
    b"sec-websocket-protocol", b"sec-websocket-extensions"})

# Decoding work one connection may do per loop turn before it yields to the
# others: decoded bytes, raw bytes, and a flat cost per frame (the library's
# per-frame Python work). One frame is the unit: a single frame may inflate
# to max_size in one zlib call.
_TURN_BUDGET = 1 << 20
_FRAME_COST = 4096


# Why the transport is not read, one bit per reason (`paused`); reading
# resumes when none is left. Plain ints, not an enum.IntFlag: they are tested
# several times per message, and IntFlag arithmetic costs about a
# microsecond an operation.
_QUEUE_FULL = 1     # the app has not taken what was decoded
_WRITE_BLOCKED = 2  # the transport paused our writing
_BACKLOG = 4        # undecoded input waits for the next loop turn
_BUDGET_FULL = 8    # the connection's WebSockets together hold their Budget (HTTP/2)
_HOLD = _QUEUE_FULL | _WRITE_BLOCKED | _BUDGET_FULL  # reasons that stop decoding
# Reasons that are ours, not the client's: the app (or this loop turn) is
# behind. While one holds, a pong the client sent may wait unread behind the
# messages before it, so its keepalive deadline waits too (_pong_overdue).
_OURS = _QUEUE_FULL | _BACKLOG | _BUDGET_FULL


class Budget:
    """Decoded bytes not yet received by the apps of all the WebSockets one
    HTTP/2 connection carries (RFC 8441), and those it holds: one client's
    streams share one bound, as a single WebSocket's messages do."""

    __slots__ = ("total", "held", "owner")

    def __init__(self) -> None:
        self.total = 0
        self.held: set[WebSocketProtocol] = set()
        # The WebSocket whose app waits with nothing queued that may decode
        # while the connection is over budget (see the module's docstring).
        self.owner: WebSocketProtocol | None = None

    def release(self, everyone: bool) -> None:
        """Let the held WebSockets decode again: all of them (the total fell
        to half), or those whose apps wait with nothing queued (the owner's
        turn is over: one of them takes it)."""
        for ws in list(self.held):
            if everyone or (ws.app_waiting and not ws.queue):
                self.held.discard(ws)
                ws._unhold(_BUDGET_FULL)


class _ServerProtocol(ServerProtocol):
    """The library's server side, with the app's subprotocol choice as a class
    method: ServerProtocol stores a `select_subprotocol` argument bound to
    the instance, a reference cycle that only the cyclic gc frees."""

    chosen: str | None = None

    def select_subprotocol(self, subprotocols: Sequence[str]) -> Subprotocol | None:
        if self.chosen is None:
            return None
        if self.chosen not in subprotocols:
            log.warning("websocket_subprotocol_not_offered", subprotocol=self.chosen,
                        offered=list(subprotocols))
            return None
        return Subprotocol(self.chosen)


def websocket_scope(http_scope: HTTPScope) -> WebSocketScope:
    """The ASGI websocket scope for an upgrade request parsed as HTTP."""
    subprotocols: list[str] = []
    for name, value in http_scope["headers"]:
        if name == b"sec-websocket-protocol":
            subprotocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    return {
        "type": "websocket",
        "asgi": http_scope["asgi"],
        "http_version": http_scope["http_version"],
        "scheme": "ws" if http_scope["scheme"] == "http" else "wss",
        "server": http_scope["server"],
        "client": http_scope["client"],
        "root_path": http_scope["root_path"],
        "path": http_scope["path"],
        "raw_path": http_scope["raw_path"],
        "query_string": http_scope["query_string"],
        "headers": http_scope["headers"],
        "subprotocols": subprotocols,
        "state": http_scope["state"],
        "extensions": {"websocket.http.response": {}, **http_scope.get("extensions", {})},
    }


def request_bytes(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The upgrade request again, for ServerProtocol's own handshake checks."""
    lines = [b"GET ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class WebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        # connection
        "state", "loop", "app", "scope", "ws", "transport", "flow", "raw", "phase",
        "close_deadline", "ping_handle", "pong_handle", "ping_payload", "pong_deferred",
        "write_blocked_at",
        # input not decoded yet, and why it is not read
        "pending", "pending_at", "frame_left", "eof", "paused", "reading_paused",
        "feed_handle",
        # messages to the app
        "queue", "queued_bytes", "partial_bytes", "wakeup", "fragments", "fragment_opcode",
        "budget", "app_waiting", "disconnect_code", "disconnect_reason", "lost",
        # handshake
        "request", "http2", "extensions_header", "denial", "denial_body",
    )

    def __init__(self, state: ServerState, app: ASGIApp, http_scope: HTTPScope,
                 raw_request: bytes | None) -> None:
        """raw_request: the HTTP/1.1 upgrade request (and any bytes after it),
        which the library checks and answers with its 101; None for an
        HTTP/2 extended CONNECT (RFC 8441), checked here from the scope's
        headers and answered through the carrier's respond() (no key, no
        101: RFC 8441 5)."""
        settings = state.settings.websocket
        self.state = state
        self.loop = state.loop
        self.app = app
        self.scope = websocket_scope(http_scope)
        self.ws = _ServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()] if settings.per_message_deflate
            else None,
            max_size=settings.max_size,
            logger=_LIB_LOG,
            state=State.OPEN if raw_request is None else State.CONNECTING,
        )
        self.transport: Any = None
        self.flow = FlowControl(self.loop)
        self.raw = raw_request or b""
        self.http2 = raw_request is None
        self.extensions_header: str | None = None
        self.phase = _CONNECTING
        self.close_deadline = 0.0
        self.ping_handle: asyncio.TimerHandle | None = None
        self.pong_handle: asyncio.TimerHandle | None = None
        self.ping_payload = b""
        self.pong_deferred = False  # its deadline passed while we were not reading
        self.write_blocked_at = 0.0
        self.pending = b""
        self.pending_at = 0
        self.frame_left = 0
        self.eof = False
        self.paused = 0
        self.reading_paused = False
        self.feed_handle: asyncio.Handle | None = None
        self.queue: deque[WebSocketConnectEvent | WebSocketReceiveEvent] = deque()
        self.queued_bytes = 0
        self.partial_bytes = 0
        self.budget: Budget | None = None
        self.app_waiting = False  # in receive() with nothing queued
        self.wakeup = Wakeup(self.loop)
        self.fragments: list[bytes] = []
        self.fragment_opcode: Opcode | None = None
        self.disconnect_code: int | None = None
        self.disconnect_reason = ""
        self.lost = False
        self.request: Request | None = None
        self.denial: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.denial_body: list[bytes] = []

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.state.connection_opened(self)
        self.budget = transport.get_extra_info("websocket_budget")
        if self.http2:
            self._start_h2()
            return
        raw, self.raw = self.raw, b""
        # The request as one piece (it is complete: the HTTP/1.1 parser read
        # it), then what the client sent after it, frame by frame.
        end = raw.find(b"\r\n\r\n")
        head, rest = (raw, b"") if end < 0 else (raw[:end + 4], raw[end + 4:])
        self.ws.receive_data(head)
        self._events()
        self._flush()
        if self.request is None and not self.lost:
            # ServerProtocol refused the request line or headers; it queued
            # its own HTTP error answer, which _flush wrote.
            self.transport.close()
        elif rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        if self.reading_paused:
            # Delivered after we asked for a pause (a TLS record already
            # decrypted, the H1 protocol resuming after the switch): kept,
            # and the pause asked for again.
            self.transport.pause_reading()
        if self.pending_at < len(self.pending):
            self.pending = self.pending[self.pending_at:] + data
        else:
            self.pending = data
        self.pending_at = 0
        if not self.paused & _HOLD:
            self._feed()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._give_eof()
        return None

    def _give_eof(self) -> None:
        """The client's EOF reaches the library after the input before it."""
        if self.eof and not self.lost and self.pending_at >= len(self.pending):
            self.eof = False
            self.ws.receive_eof()
            self._events()
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.phase = _DONE
        budget = self.budget
        if budget is not None and budget.owner is self:
            budget.owner = None  # no more of its message will come
            budget.release(everyone=False)
        self.state.connection_closed(self)
        self._cancel_timers()
        self.flow.connection_lost()
        self._disconnected(_ABNORMAL)
        self._release()

    def _release(self) -> None:
        """Drop what a closed connection holds, without waiting for the
        cyclic gc: the undecoded input, and the library's parser, a
        generator whose frame holds its protocol (a cycle of ServerProtocol
        with itself, holding the inflate state and read buffer). Messages
        already queued stay for the app. (The transport drops its reference
        to us after connection_lost, asyncio's and uvloop's alike.)"""
        self.pending = b""
        self.ws.parser.close()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        self.write_blocked_at = self.loop.time()
        self.paused |= _WRITE_BLOCKED
        self._apply_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.write_blocked_at = 0.0
        self._unhold(_WRITE_BLOCKED)

    # -- from the network --------------------------------------------------------

    def _feed(self) -> None:
        """Decode pending input one frame at a time until it is gone, a hold
        reason appears, or this turn's budget is spent."""
        self.feed_handle = None
        self.paused &= ~_BACKLOG
        budget = _TURN_BUDGET
        while self.pending_at < len(self.pending) and not self.paused & _HOLD and not self.lost:
            if self.budget is not None and self._over_budget(self.budget):
                break
            start = self.pending_at
            end = self._frame_end()
            if end == start:
                break  # an incomplete frame header: wait for more bytes
            self.pending_at = end
            self.ws.receive_data(self.pending[start:end])
            budget -= (end - start) + self._events()
            self._flush()
            if budget <= 0:
                break
        if self.lost:
            return
        if self.pending_at >= len(self.pending):
            self.pending, self.pending_at = b"", 0
            self._give_eof()
        elif budget <= 0 and not self.paused & _HOLD:
            self._backlog()
        self._apply_reading()

    def _frame_end(self) -> int:
        """Where in `pending` the bytes of the frame now arriving end (RFC
        6455 5.2: 2 bytes, then a 2- or 8-byte extended length, then a 4-byte
        mask key, then the payload), so each call to the library decodes at
        most one frame. A frame already partly given: the rest of it."""
        buf, at = self.pending, self.pending_at
        if self.frame_left:
            end = min(len(buf), at + self.frame_left)
            self.frame_left -= end - at
            return end
        if len(buf) - at < 2:
            return at
        second = buf[at + 1]
        length = second & 0x7F
        head = 2 if length < 126 else 4 if length == 126 else 10
        if second & 0x80:
            head += 4
        if len(buf) - at < head:
            return at
        if length >= 126:
            length = int.from_bytes(buf[at + 2:at + (4 if length == 126 else 10)], "big")
        end = min(len(buf), at + head + length)
        self.frame_left = head + length - (end - at)
        return end

    def _over_budget(self, budget: Budget) -> bool:
        """Before a frame is decoded: hold it (and reading) while the
        connection's WebSockets hold their budget, unless this one's app
        waits with nothing queued and no other has that turn."""
        if budget.total < self.state.settings.websocket.max_queue_bytes:
            return False
        if self.app_waiting and not self.queue and budget.owner in (None, self):
            budget.owner = self
            return False
        self.paused |= _BUDGET_FULL
        budget.held.add(self)
        return True

    def _charge(self, size: int) -> None:
        """Decoded bytes queued (size > 0) or taken by the app (< 0)."""
        budget = self.budget
        if budget is None:
            return
        budget.total += size
        if budget.owner is self and self.queue:
            budget.owner = None  # its message is queued: the turn is over
            budget.release(everyone=False)

    def _leave_budget(self) -> None:
        """The app is done: what it left queued no longer counts."""
        budget, self.budget = self.budget, None
        if budget is None:
            return
        budget.total -= self.queued_bytes + self.partial_bytes
        budget.held.discard(self)
        if budget.owner is self:
            budget.owner = None
        budget.release(everyone=budget.total <= (
            self.state.settings.websocket.max_queue_bytes // 2))

    def _backlog(self) -> None:
        self.paused |= _BACKLOG
        if self.feed_handle is None:
            self.feed_handle = self.loop.call_soon(self._feed)

    def _unhold(self, reason: int) -> None:
        self.paused &= ~reason
        if self.lost:
            return
        if not self.paused & _HOLD and (self.pending_at < len(self.pending) or self.eof):
            self._backlog()  # decoded on the next turn, not inside the caller
        self._apply_reading()

    def _apply_reading(self) -> None:
        if self.lost:
            return
        if self.paused and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not self.paused and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
            if self.pong_deferred:
                # All we held back is read: the client's pong, if it sent
                # one, came with it. It has a whole ping_timeout from now.
                # (Here, not on every call: a deferral needs reading paused,
                # and this is where it ends; a write block that outlasts it
                # defers the wait until that ends too, send_timeout at most.)
                self.pong_deferred = False
                self.pong_handle = self.loop.call_later(
                    self.state.settings.websocket.ping_timeout, self._pong_overdue)

    def _events(self) -> int:
        """Handle what the library decoded; returns the decoded bytes."""
        decoded = 0
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                decoded += len(event.data) + _FRAME_COST
                self._frame(event)
            elif isinstance(event, Request):
                self._start(event)
        if self.ws.parser_exc is not None and self.disconnect_code is None:
            # The client broke the protocol (or left mid-frame): the library
            # sent its close (1002, 1007, 1009...). For the app that is a
            # disconnect (ASGI: websocket.disconnect, and send() raises).
            sent = self.ws.close_sent
            self._disconnected(sent.code if sent is not None else _ABNORMAL)
        return decoded

    def _start_h2(self) -> None:
        """RFC 8441 5: the extended CONNECT carries the upgrade's headers
        but no key. Version and extensions are checked as RFC 6455 4.2.1
        asks; the app chooses the subprotocol when it accepts."""
        headers = Headers([(name.decode("latin-1"), value.decode("latin-1"))
                           for name, value in self.scope["headers"]])
        refusal = ""
        if headers.get_all("Sec-WebSocket-Version") != ["13"]:
            refusal = "Sec-WebSocket-Version must be 13"
        else:
            try:
                self.extensions_header, self.ws.extensions = self.ws.process_extensions(headers)
            except InvalidHandshake as exc:
                refusal = f"invalid Sec-WebSocket-Extensions: {exc}"
        if refusal:
            log.info("websocket_handshake_refused", path=self.scope["path"], detail=refusal)
            self._deny(400, [(b"content-type", b"text/plain")], refusal.encode())
            return
        self._start(None)

    def _start(self, request: Request | None) -> None:
        self.request = request
        self.queue.append({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_app())
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = frame.data if isinstance(frame.data, bytes) else bytes(frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode, data)
            else:
                self.fragment_opcode = opcode
                self.fragments = [data]
                self.partial_bytes = len(data)
                self._charge(len(data))
                self._check_queue()
        elif opcode is Opcode.CONT:
            self.fragments.append(data)
            self.partial_bytes += len(data)
            self._charge(len(data))
            if frame.fin and self.fragment_opcode is not None:
                self._charge(-self.partial_bytes)
                data, self.fragments, self.partial_bytes = b"".join(self.fragments), [], 0
                self._message(self.fragment_opcode, data)
                self.fragment_opcode = None
            else:
                self._check_queue()
        elif opcode is Opcode.PONG:
            if data == self.ping_payload and (self.pong_handle is not None or
                                              self.pong_deferred):
                if self.pong_handle is not None:
                    self.pong_handle.cancel()
                self.pong_handle = None
                self.pong_deferred = False
                self._schedule_ping()
        elif opcode is Opcode.CLOSE:
            rcvd = self.ws.close_rcvd
            self._disconnected(rcvd.code if rcvd else 1005, rcvd.reason if rcvd else "")
        # PING: ServerProtocol has queued the pong already.

    def _message(self, opcode: Opcode, data: bytes) -> None:
        message: WebSocketReceiveEvent
        if opcode is Opcode.TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.ws.fail(_INVALID_DATA, "invalid UTF-8")
                self._disconnected(_INVALID_DATA)
                return
            message = {"type": "websocket.receive", "text": text}
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.append(message)
        size = _size(message)
        self.queued_bytes += size
        self._charge(size)
        self._check_queue()
        self._wake()

    def _check_queue(self) -> None:
        """Hold decoding (and reading) once the app has this much to take.
        Only with a whole message queued: a message in pieces is what the
        app waits for, and the library bounds it at max_size."""
        settings = self.state.settings.websocket
        if self.queue and (len(self.queue) >= settings.max_queue or
                           self.queued_bytes + self.partial_bytes >= settings.max_queue_bytes):
            self.paused |= _QUEUE_FULL

    def _disconnected(self, code: int, reason: str = "") -> None:
        if self.disconnect_code is None:
            self.disconnect_code = code
            self.disconnect_reason = reason
        self._wake()

    def _wake(self) -> None:
        self.wakeup.wake()

    # -- ASGI ----------------------------------------------------------------------

    async def receive(self) -> WebSocketEvent:
        while not self.queue:
            if self.disconnect_code is not None:
                return {"type": "websocket.disconnect", "code": self.disconnect_code,
                        "reason": self.disconnect_reason}
            self.app_waiting = True
            budget = self.budget
            if self.paused & _BUDGET_FULL and budget is not None and budget.owner is None:
                budget.held.discard(self)  # its turn to decode a message (_over_budget)
                self._unhold(_BUDGET_FULL)
            try:
                await self.wakeup.wait()
            finally:
                self.app_waiting = False
        message = self.queue.popleft()
        size = _size(message)
        self.queued_bytes -= size
        budget = self.budget
        if budget is not None:
            budget.total -= size
            if budget.held and budget.total <= self.state.settings.websocket.max_queue_bytes // 2:
                budget.release(everyone=True)  # half-way down, as for one WebSocket
        if self.paused & _QUEUE_FULL:
            settings = self.state.settings.websocket
            # Half-way down before reading again, not one message at a time.
            if not self.queue or (len(self.queue) <= settings.max_queue // 2 and
                                  self.queued_bytes + self.partial_bytes
                                  <= settings.max_queue_bytes // 2):
                self._unhold(_QUEUE_FULL)
        return message

    async def send(self, message: WebSocketSendMessage) -> None:
        # `kind` picks the branch; mypy narrows a TypedDict union only on
        # message["type"] itself, so each branch names its member.
        kind = message["type"]
        if kind == "websocket.send":
            if self.phase != _OPEN or self.ws.state is not State.OPEN:
                self._refuse(kind)
            data: WebSocketSendEvent = message  # type: ignore[assignment]
            text = data.get("text")
            if text is not None:
                self.ws.send_text(text.encode())
            else:
                self.ws.send_binary(data.get("bytes") or b"")
            self._flush()
            if self.flow.write_paused:
                await self.flow.drain()
                if self.lost:
                    raise ClientDisconnected("websocket closed while sending")
        elif kind == "websocket.accept":
            if self.phase != _CONNECTING:
                self._refuse(kind)
            self._accept(message)  # type: ignore[arg-type]
        elif kind == "websocket.close":
            if self.phase == _CONNECTING:
                # Closed before accepting: the handshake is refused (ASGI: 403).
                self._deny(403, [], b"")
            elif self.phase == _OPEN and self.ws.state is State.OPEN:
                close: WebSocketCloseEvent = message  # type: ignore[assignment]
                self.ws.send_close(close.get("code") or 1000, close.get("reason") or "")
                self.close_deadline = self.loop.time() + _CLOSE_TIMEOUT
                self._flush()
        elif kind == "websocket.http.response.start":
            if self.phase != _CONNECTING:
                self._refuse(kind)
            start: WebSocketResponseStartEvent = message  # type: ignore[assignment]
            self.phase = _HTTP_DENIAL
            self.denial = (int(start["status"]), list(start.get("headers", ())))
        elif kind == "websocket.http.response.body":
            if self.phase != _HTTP_DENIAL or self.denial is None:
                self._refuse(kind)
            body: WebSocketResponseBodyEvent = message  # type: ignore[assignment]
            self.denial_body.append(body.get("body", b""))
            if not body.get("more_body", False):
                status, headers = self.denial
                self._deny(status, headers, b"".join(self.denial_body))
        else:
            raise ProtocolError(f"unexpected ASGI message type {kind!r}")

    def _refuse(self, kind: str) -> NoReturn:
        if self.lost or self.phase == _DONE or self.disconnect_code is not None:
            raise ClientDisconnected(f"websocket closed before {kind}")
        raise ProtocolError(f"{kind} not allowed now")

    def _accept(self, message: WebSocketAcceptEvent) -> None:
        self.ws.chosen = message.get("subprotocol")
        if self.http2:
            self._accept_h2(message)
            return
        assert self.request is not None
        reply = self.ws.accept(self.request)
        if reply.status_code == 101:
            reply.headers["Server"] = "zion"
            for name, value in message.get("headers", ()):
                key = name.decode("latin-1")
                if key.lower() not in ("sec-websocket-protocol", "date", "server"):
                    reply.headers[key] = value.decode("latin-1")
            self.phase = _OPEN
            self._schedule_ping()
        else:
            self.phase = _DONE  # a bad handshake: ServerProtocol's own 4xx
            self._disconnected(_ABNORMAL)
        self.ws.send_response(reply)
        self._flush()
        if self.state.access_log:
            log.info("access", method="GET", path=self.scope["path"], status=reply.status_code,
                     client=self.scope["client"][0] if self.scope["client"] else None)

    def _accept_h2(self, message: WebSocketAcceptEvent) -> None:
        """RFC 8441 5: a 200 accepts, and the stream stays open both ways."""
        pairs: list[tuple[bytes, bytes]] = []
        subprotocol = self.ws.select_subprotocol(self.scope["subprotocols"])
        if subprotocol is not None:
            pairs.append((b"sec-websocket-protocol", subprotocol.encode()))
        if self.extensions_header is not None:
            pairs.append((b"sec-websocket-extensions", self.extensions_header.encode()))
        pairs += _h2_pairs(message.get("headers", ()))
        self.phase = _OPEN
        self._schedule_ping()
        self.transport.respond(200, pairs, b"", False)
        if self.state.access_log:
            log.info("access", method="CONNECT", path=self.scope["path"], status=200,
                     client=self.scope["client"][0] if self.scope["client"] else None)

    def _deny(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """An HTTP answer instead of the upgrade; the connection (over
        HTTP/2: the stream) then closes."""
        self.phase = _DONE
        if self.http2:
            pairs = _h2_pairs(headers)
            if not self.lost:
                self.transport.respond(status, pairs, body, True)
                self.transport.close()
            self._disconnected(_ABNORMAL)
            return
        parts = [response.status_line(status), self.state.date.prefix]
        for name, value in headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise ProtocolError(f"invalid response header {name!r}")
            if name.lower() not in (b"content-length", b"connection", b"server", b"date"):
                parts += (name, b": ", value, b"\r\n")
        parts += (b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body)
        if not self.lost:
            self.transport.write(b"".join(parts))
            self.transport.close()
        self._disconnected(_ABNORMAL)

    async def _run_app(self) -> None:
        try:
            await self._call_app()
        finally:
            self._leave_budget()

    async def _call_app(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected as exc:
            # ASGI spec 2.4: send() after the client left (or broke the
            # protocol) raises this OSError; an app that lets it out is done,
            # not failing.
            log.debug("websocket_app_ended_by_disconnect", path=self.scope["path"],
                      code=self.disconnect_code, error=str(exc))
        except Exception as exc:
            if self.disconnect_code is not None:
                # Typically Starlette's WebSocketDisconnect raised out of an
                # endpoint after the client left: not an app failure.
                log.debug("app_error_after_disconnect", path=self.scope["path"],
                          error=repr(exc))
            else:
                log.error("app_error", path=self.scope["path"], error=repr(exc),
                          exc_info=not isinstance(exc, ProtocolError))
            self._end(500, _INTERNAL_ERROR)
        else:
            if self.phase == _CONNECTING:
                log.error("websocket_not_accepted", path=self.scope["path"])
            self._end(500, 1000)

    def _end(self, http_status: int, close_code: int) -> None:
        """The app is done: finish whatever it left open."""
        if self.lost:
            return
        if self.phase in (_CONNECTING, _HTTP_DENIAL):
            self._deny(http_status, [], b"")
        elif self.phase == _OPEN and self.ws.state is State.OPEN:
            self.ws.send_close(close_code)
            self.close_deadline = self.loop.time() + _CLOSE_TIMEOUT
            self._flush()

    # -- keep-alive pings ----------------------------------------------------------

    def _schedule_ping(self) -> None:
        interval = self.state.settings.websocket.ping_interval
        if interval > 0 and not self.lost:
            self.ping_handle = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self.ping_handle = None
        if self.ws.state is not State.OPEN:
            return
        self.ping_payload = os.urandom(4)
        self.ws.send_ping(self.ping_payload)
        self._flush()
        timeout = self.state.settings.websocket.ping_timeout
        if timeout > 0:
            self.pong_handle = self.loop.call_later(timeout, self._pong_overdue)
        else:
            self._schedule_ping()

    def _pong_overdue(self) -> None:
        self.pong_handle = None
        if self.paused & _OURS:
            # We stopped reading (the app does not receive): the pong may be
            # waiting, unread, behind the messages the app has not taken. The
            # peer is not late, we are: its deadline starts again once we
            # read (_apply_reading). A peer that is really gone is still
            # found: by send_timeout if the app sends, by the deadline once
            # the app receives again.
            self.pong_deferred = True
            log.info("websocket_pong_wait_deferred", path=self.scope["path"])
            return
        log.info("websocket_ping_timeout", path=self.scope["path"])
        self.ws.fail(_INTERNAL_ERROR, "keepalive ping timeout")
        self._flush()
        self._disconnected(_ABNORMAL)

    def _cancel_timers(self) -> None:
        for handle in (self.ping_handle, self.pong_handle, self.feed_handle):
            if handle is not None:
                handle.cancel()
        self.ping_handle = self.pong_handle = self.feed_handle = None

    # -- output --------------------------------------------------------------------

    def _flush(self) -> None:
        for data in self.ws.data_to_send():
            if self.lost:
                return
            if data:
                self.transport.write(data)
            else:
                # SEND_EOF: TLS has no half-close, so the server closes.
                self.transport.close()

    # -- worker control ------------------------------------------------------------

    def check_deadline(self, now: float) -> None:
        if self.lost:
            return
        if self.write_blocked_at and now - self.write_blocked_at > self.state.limits.send_timeout:
            # The client has taken nothing for send_timeout: abort, since
            # close() would wait to flush the buffer it never reads.
            log.info("websocket_send_timeout", path=self.scope["path"])
            self.transport.abort()
        elif self.close_deadline and now > self.close_deadline:
            self.transport.close()  # the peer never answered our close frame

    def shutdown(self) -> None:
        """Drain begins: an open WebSocket keeps the drain timeout to finish."""

    def close(self) -> None:
        """Drain is over (or the worker is stopping): close with 1001."""
        if self.lost:
            return
        if self.phase == _OPEN and self.ws.state is State.OPEN:
            self.ws.send_close(_GOING_AWAY, "server shutting down")
            self._disconnected(_GOING_AWAY)
            self._flush()
        self.transport.close()


def _size(message: Mapping[str, Any]) -> int:
    """What a queued message holds in memory, for websocket.max_queue_bytes
    (a str of non-Latin-1 text takes 2 or 4 bytes a character)."""
    text = message.get("text")
    if text is not None:
        return sys.getsizeof(text)
    return len(message.get("bytes") or b"")


def _h2_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """An app's response headers for an HTTP/2 HEADERS frame: lowercase
    names (RFC 9113 8.2.1), no connection-specific ones, no CR/LF/NUL."""
    pairs = []
    for name, value in headers:
        name = bytes(name).lower()
        value = bytes(value)
        if any(c in name or c in value for c in (b"\r", b"\n", b"\0")):
            raise ProtocolError(f"invalid response header {name!r}")
        if name not in _H2_NOT_FORWARDED:
            pairs.append((name, value))
    return pairs
