"""One request/response exchange: the ASGI `receive` and `send` callables.

Request state lives here, apart from the connection state in protocol.py, so
a pipelined request can buffer its body while an earlier one is answered.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from zion.http.response import status_line
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.protocol import HttpProtocol

log = get_logger("zion.http")

_NO_BODY_STATUS = frozenset({204, 304})
_RESPONSE_MESSAGES = frozenset({"http.response.start", "http.response.body"})
# Body chunks buffered for an app that has not read them; past this the
# connection stops reading from the socket until the app catches up.
_BODY_HIGH_WATER = 65536


class ProtocolError(Exception):
    """The app broke the ASGI contract (bad message, bad header)."""


class RequestCycle:
    __slots__ = (
        "protocol", "scope", "keep_alive", "head", "expect_100", "started_at",
        # request body, fed by the parser
        "body", "body_size", "body_complete", "body_delivered", "waiter", "disconnected",
        # response
        "response_started", "response_complete", "status", "headers", "chunked",
        "content_length", "written",
    )

    def __init__(self, protocol: HttpProtocol, scope: dict[str, Any], keep_alive: bool,
                 expect_100: bool, started_at: float) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.head = scope["method"] == "HEAD"
        self.expect_100 = expect_100
        # request body, filled by the parser
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_complete = False
        self.body_delivered = False
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        # response
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.content_length: int | None = None
        self.written = 0
        self.started_at = started_at

    # -- fed by the protocol -------------------------------------------------

    def feed_body(self, chunk: bytes) -> None:
        self.body.append(chunk)
        self.body_size += len(chunk)
        if self.body_size > _BODY_HIGH_WATER:
            self.protocol.pause_reading()
        self._wake()

    def message_complete(self) -> None:
        self.body_complete = True
        self._wake()

    def lost(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- ASGI ----------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        while not self.body_delivered and not self.disconnected:
            if self.body or self.body_complete:
                return self._take_body()
            if self.expect_100 and not self.response_started:
                self.expect_100 = False
                self.protocol.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.protocol.resume_reading()
            await self._wait()
        # Body fully delivered: per ASGI, further receive() calls wait for the
        # response to finish or the client to go away.
        while not self.disconnected and not self.response_complete:
            await self._wait()
        return {"type": "http.disconnect"}

    def _take_body(self) -> dict[str, Any]:
        chunks = self.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = []
        more = not self.body_complete
        if more:
            self.protocol.resume_reading()
        else:
            self.body_delivered = True
        return {"type": "http.request", "body": body, "more_body": more}

    async def _wait(self) -> None:
        if self.waiter is None:
            self.waiter = self.protocol.loop.create_future()
        await self.waiter

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if (self.disconnected or self.response_complete) and kind in _RESPONSE_MESSAGES:
            return  # the client is gone: nothing to write to
        if kind == "http.response.start":
            if self.response_started:
                raise ProtocolError("http.response.start sent twice")
            self.response_started = True
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
            return
        if kind == "http.response.body":
            if not self.response_started:
                raise ProtocolError("http.response.body sent before http.response.start")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.content_length is None:  # head not written yet
                self._write_head(body, more)
            else:
                self._write_body(body, more)
            if not more:
                self.response_complete = True
                self._wake()
                self.protocol.response_done(self)
            elif self.protocol.flow.write_paused:
                await self.protocol.flow.drain()
            return
        raise ProtocolError(f"unexpected ASGI message type {kind!r}")

    def _write_head(self, body: bytes, more: bool) -> None:
        proto = self.protocol
        parts = [status_line(self.status), proto.state.date.prefix]
        content_length = None
        for name, value in self.headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise ProtocolError(f"invalid response header {name!r}")
            lname = name.lower()
            if lname == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    raise ProtocolError(f"invalid content-length {value!r}") from None
                continue  # written once below, normalised
            elif lname == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            elif lname == b"transfer-encoding" or lname == b"server" or lname == b"date":
                continue
            parts += (name, b": ", value, b"\r\n")
        no_body = self.status in _NO_BODY_STATUS or self.status < 200
        if content_length is None and not no_body:
            if not more:
                content_length = len(body)
                parts += (b"content-length: ", str(content_length).encode(), b"\r\n")
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0 without a length: close-delimited
        elif content_length is not None:
            parts += (b"content-length: ", str(content_length).encode(), b"\r\n")
        self.content_length = content_length if content_length is not None else -1
        if not self.keep_alive or proto.state.draining:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if self.head or no_body:
            body = b""
        elif self.chunked and body:
            parts += (b"%x\r\n" % len(body), body, b"\r\n")
            body = b""
        if self.chunked and not more:
            parts.append(b"0\r\n\r\n")
        parts.append(body)
        self.written += len(body)
        proto.write(b"".join(parts))

    def _write_body(self, body: bytes, more: bool) -> None:
        if self.head or self.status in _NO_BODY_STATUS:
            return
        proto = self.protocol
        if self.chunked:
            if body:
                proto.write(b"%x\r\n%b\r\n" % (len(body), body))
            if not more:
                proto.write(b"0\r\n\r\n")
        elif body:
            proto.write(body)
        self.written += len(body)

    # -- running the app -----------------------------------------------------

    def run(self, app: Any) -> None:
        """Start the app and run it eagerly up to its first real suspension.

        A typical handler reads a complete body and sends its response without
        ever blocking, so it finishes inside this call and no Task is created
        for it; only one that awaits something real is wrapped in a Task.
        """
        ctx = contextvars.copy_context()
        coro = self._guarded(app)
        try:
            pending = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = self.protocol.loop.create_task(_resume(coro, pending), context=ctx)
        bg = self.protocol.state.background
        bg.add(task)
        task.add_done_callback(bg.discard)

    async def _guarded(self, app: Any) -> None:
        proto = self.protocol
        proto.state.slot.inflight += 1
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:
            log.error("app_error", path=self.scope["path"], error=repr(exc),
                      exc_info=not isinstance(exc, ProtocolError))
            if not self.response_started and not self.disconnected:
                self.keep_alive = False
                self.status = 500
                proto.send_error(500, "")
                proto.response_done(self)
            elif not self.response_complete:
                proto.close()  # half a response: only closing tells the client
            # else: the app answered (Starlette sends its own 500) and then
            # re-raised; the connection is in a clean state and stays open.
        else:
            if not self.response_complete and not self.disconnected:
                if not self.response_started:
                    log.error("app_no_response", path=self.scope["path"])
                    self.keep_alive = False
                    self.status = 500
                    proto.send_error(500, "")
                    proto.response_done(self)
                else:
                    log.error("app_incomplete_response", path=self.scope["path"])
                    proto.close()
        finally:
            proto.state.slot.inflight -= 1


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], pending: Any) -> Generator[Any, Any, None]:
    """Hand a coroutine that was started outside a Task over to a Task.

    The Task sees the future the coroutine is blocked on, and resumes or
    cancels it exactly as if it had run the coroutine from the start.
    """
    while True:
        try:
            yield pending
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            pending = coro.send(None)
        except StopIteration:
            return
