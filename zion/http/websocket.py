"""WebSocket (RFC 6455) with the ASGI `websocket` scope.

Framing, the opening handshake, permessage-deflate and close-handshake rules
come from the `websockets` library's sans-I/O `ServerProtocol` (uvicorn's
default since 0.50); this module moves bytes between it and the transport and
messages between it and the app. The HTTP/1.1 protocol hands the transport
over with `transport.set_protocol` once the parser stops at the upgrade point.

Back-pressure both ways: past `websocket.max_queue` messages the app has not
received, the socket is not read; an app's send() waits while the transport's
write buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

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


def websocket_scope(http_scope: dict[str, Any]) -> dict[str, Any]:
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
        "close_deadline", "ping_handle", "pong_handle", "ping_payload",
        # messages to the app
        "queue", "wakeup", "read_paused", "fragments", "fragment_opcode", "disconnect_code",
        "disconnect_reason", "lost",
        # handshake
        "request", "subprotocol", "denial", "denial_body",
    )

    def __init__(self, state: ServerState, app: ASGIApp, http_scope: dict[str, Any],
                 raw_request: bytes) -> None:
        settings = state.settings.websocket
        self.state = state
        self.loop = state.loop
        self.app = app
        self.scope = websocket_scope(http_scope)
        self.ws = ServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()] if settings.per_message_deflate
            else None,
            max_size=settings.max_size,
            # A plain function: ServerProtocol binds it to itself as a method.
            select_subprotocol=lambda _proto, offered: self._select_subprotocol(offered),
            logger=_LIB_LOG,
        )
        self.transport: Any = None
        self.flow = FlowControl(self.loop)
        self.raw = raw_request
        self.phase = _CONNECTING
        self.close_deadline = 0.0
        self.ping_handle: asyncio.TimerHandle | None = None
        self.pong_handle: asyncio.TimerHandle | None = None
        self.ping_payload = b""
        self.queue: deque[dict[str, Any]] = deque()
        self.wakeup = Wakeup(self.loop)
        self.read_paused = False
        self.fragments: list[bytes] = []
        self.fragment_opcode: Opcode | None = None
        self.disconnect_code: int | None = None
        self.disconnect_reason = ""
        self.lost = False
        self.request: Request | None = None
        self.subprotocol: str | None = None
        self.denial: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.denial_body: list[bytes] = []

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.state.connection_opened(self)
        raw, self.raw = self.raw, b""
        self.data_received(raw)
        if self.request is None and not self.lost:
            # ServerProtocol refused the request line or headers; it queued
            # its own HTTP error answer, which _flush wrote.
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._start(event)
        self._flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.phase = _DONE
        self.state.connection_closed(self)
        self._cancel_timers()
        self.flow.connection_lost()
        self._disconnected(_ABNORMAL)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # -- from the network --------------------------------------------------------

    def _start(self, request: Request) -> None:
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
        elif opcode is Opcode.CONT:
            self.fragments.append(data)
            if frame.fin and self.fragment_opcode is not None:
                data, self.fragments = b"".join(self.fragments), []
                self._message(self.fragment_opcode, data)
                self.fragment_opcode = None
        elif opcode is Opcode.PONG:
            if data == self.ping_payload and self.pong_handle is not None:
                self.pong_handle.cancel()
                self.pong_handle = None
                self._schedule_ping()
        elif opcode is Opcode.CLOSE:
            rcvd = self.ws.close_rcvd
            self._disconnected(rcvd.code if rcvd else 1005, rcvd.reason if rcvd else "")
        # PING: ServerProtocol has queued the pong already.

    def _message(self, opcode: Opcode, data: bytes) -> None:
        if opcode is Opcode.TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.ws.fail(_INVALID_DATA, "invalid UTF-8")
                self._disconnected(_INVALID_DATA)
                return
            self.queue.append({"type": "websocket.receive", "text": text})
        else:
            self.queue.append({"type": "websocket.receive", "bytes": data})
        if len(self.queue) >= self.state.settings.websocket.max_queue and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def _disconnected(self, code: int, reason: str = "") -> None:
        if self.disconnect_code is None:
            self.disconnect_code = code
            self.disconnect_reason = reason
        self._wake()

    def _wake(self) -> None:
        self.wakeup.wake()

    # -- ASGI ----------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        while not self.queue:
            if self.disconnect_code is not None:
                return {"type": "websocket.disconnect", "code": self.disconnect_code,
                        "reason": self.disconnect_reason}
            await self.wakeup.wait()
        message = self.queue.popleft()
        if self.read_paused and len(self.queue) <= self.state.settings.websocket.max_queue // 2:
            self.read_paused = False
            if not self.lost:
                self.transport.resume_reading()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if self.phase != _OPEN or self.ws.state is not State.OPEN:
                self._refuse(kind)
            text = message.get("text")
            if text is not None:
                self.ws.send_text(text.encode())
            else:
                self.ws.send_binary(message.get("bytes") or b"")
            self._flush()
            await self.flow.drain()
        elif kind == "websocket.accept":
            if self.phase != _CONNECTING:
                self._refuse(kind)
            self._accept(message)
        elif kind == "websocket.close":
            if self.phase == _CONNECTING:
                # Closed before accepting: the handshake is refused (ASGI: 403).
                self._deny(403, [], b"")
            elif self.phase == _OPEN and self.ws.state is State.OPEN:
                self.ws.send_close(message.get("code") or 1000, message.get("reason") or "")
                self.close_deadline = self.loop.time() + _CLOSE_TIMEOUT
                self._flush()
        elif kind == "websocket.http.response.start":
            if self.phase != _CONNECTING:
                self._refuse(kind)
            self.phase = _HTTP_DENIAL
            self.denial = (int(message["status"]), list(message.get("headers", ())))
        elif kind == "websocket.http.response.body":
            if self.phase != _HTTP_DENIAL or self.denial is None:
                self._refuse(kind)
            self.denial_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers = self.denial
                self._deny(status, headers, b"".join(self.denial_body))
        else:
            raise ProtocolError(f"unexpected ASGI message type {kind!r}")

    def _refuse(self, kind: str) -> NoReturn:
        if self.lost or self.phase == _DONE or self.disconnect_code is not None:
            raise ClientDisconnected(f"websocket closed before {kind}")
        raise ProtocolError(f"{kind} not allowed now")

    def _select_subprotocol(self, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        if self.subprotocol is not None and self.subprotocol not in offered:
            log.warning("websocket_subprotocol_not_offered", subprotocol=self.subprotocol,
                        offered=list(offered))
            return None
        return Subprotocol(self.subprotocol) if self.subprotocol is not None else None

    def _accept(self, message: dict[str, Any]) -> None:
        assert self.request is not None
        self.subprotocol = message.get("subprotocol")
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

    def _deny(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """An HTTP answer instead of the upgrade; the connection then closes."""
        self.phase = _DONE
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
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
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
        log.info("websocket_ping_timeout", path=self.scope["path"])
        self.ws.fail(_INTERNAL_ERROR, "keepalive ping timeout")
        self._flush()
        self._disconnected(_ABNORMAL)

    def _cancel_timers(self) -> None:
        for handle in (self.ping_handle, self.pong_handle):
            if handle is not None:
                handle.cancel()
        self.ping_handle = self.pong_handle = None

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
        if self.close_deadline and now > self.close_deadline and not self.lost:
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
