"""One request/response exchange: ASGI `receive`/`send`, and the only writer
of response state.

Request state lives here, apart from the connection's, so a pipelined
request can buffer its body while an earlier one is answered. The app runs in
a real asyncio Task created in a copy of the connection's context, so
`asyncio.current_task()`, anyio/sniffio, `asyncio.timeout`, TaskGroup and
thread-pool offloading work from the app's first line.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from zion.http import response
from zion.http.connection import ClientDisconnected
from zion.http.wakeup import Wakeup
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.connection import Connection
    from zion.http.state import ASGIApp

log = get_logger("zion.http")

_NO_BODY_STATUS = frozenset({204, 304})
# Header pairs, as zion's own handlers give them (lowercase names).
Headers = Sequence[tuple[bytes, bytes]]
# Body bytes buffered for an app that has not read them; past this the
# connection stops reading from the socket until the app catches up.
_BODY_HIGH_WATER = 65536


class ProtocolError(Exception):
    """The app broke the ASGI contract (bad message, bad header)."""


def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
               ) -> asyncio.Task[None]:
    """A Task for one request. Python 3.12 can run its first step eagerly,
    saving a trip through the ready queue; 3.11 has no correct way to."""
    if _EAGER:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    return loop.create_task(coro)


_EAGER = sys.version_info >= (3, 12)


class Exchange:
    __slots__ = (
        "conn", "scope", "keep_alive", "head", "expect_100", "started_at",
        # request body, fed by the connection
        "body", "body_size", "received", "body_complete", "body_delivered", "wakeup",
        "disconnected",
        # response
        "response_started", "response_complete", "status", "headers", "chunked",
        "content_length", "written",
    )

    def __init__(self, conn: Connection, scope: dict[str, Any], keep_alive: bool,
                 expect_100: bool, started_at: float) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head = scope["method"] == "HEAD"
        self.expect_100 = expect_100
        self.started_at = started_at
        # request body
        self.body: list[bytes] = []
        self.body_size = 0  # buffered, not yet handed to the app
        self.received = 0  # the whole body so far, for limits.max_body_size
        self.body_complete = False
        self.body_delivered = False
        self.wakeup = Wakeup(conn.loop)
        self.disconnected = False
        # response
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.content_length: int | None = None
        self.written = 0

    # -- fed by the connection -------------------------------------------------

    def feed_body(self, chunk: bytes) -> None:
        self.body.append(chunk)
        self.body_size += len(chunk)
        self.received += len(chunk)
        if self.body_size > _BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def message_complete(self) -> None:
        self.body_complete = True
        self._wake()

    def lost(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        self.wakeup.wake()

    # -- ASGI receive ----------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        while not self.body_delivered and not self.disconnected:
            if self.body or self.body_complete:
                return self._take_body()
            if self.expect_100 and not self.response_started:
                self.expect_100 = False
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.conn.resume_reading()
            await self._wait()
        # Body delivered: per ASGI, receive() now waits for the response to
        # finish or the client to leave.
        while not self.disconnected and not self.response_complete:
            await self._wait()
        return {"type": "http.disconnect"}

    def _take_body(self) -> dict[str, Any]:
        chunks = self.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = []
        self.body_size = 0
        more = not self.body_complete
        if more:
            self.conn.resume_reading()
        else:
            self.body_delivered = True
        return {"type": "http.request", "body": body, "more_body": more}

    async def _wait(self) -> None:
        await self.wakeup.wait()

    # -- ASGI send -------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.response_started:
                raise ProtocolError("http.response.body sent before http.response.start")
            self._check_open(kind)
            more = message.get("more_body", False)
            self.write_body(message.get("body", b""), more)
            if not more:
                self.complete()
            else:
                await self.conn.drain()
            return
        if kind == "http.response.start":
            if self.response_started:
                raise ProtocolError("http.response.start sent twice")
            self._check_open(kind)
            self.response_started = True
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
            return
        raise ProtocolError(f"unexpected ASGI message type {kind!r}")

    def _check_open(self, kind: str) -> None:
        if self.disconnected:
            raise ClientDisconnected(f"client disconnected before {kind}")
        if self.response_complete:
            raise ProtocolError(f"{kind} after the response was complete")

    def write_body(self, body: bytes, more: bool) -> None:
        if self.content_length is None:
            self._write_head(body, more)
            return
        if self.head or self.status in _NO_BODY_STATUS:
            return
        if self.chunked:
            if body:
                self.conn.write(b"%x\r\n%b\r\n" % (len(body), body))
            if not more:
                self.conn.write(b"0\r\n\r\n")
        elif body:
            self.conn.write(body)
        self.written += len(body)

    def _write_head(self, body: bytes, more: bool) -> None:
        conn = self.conn
        parts = [response.status_line(self.status), conn.state.date.prefix]
        own_server = False
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
            elif lname == b"transfer-encoding":
                continue
            elif lname == b"server":
                own_server = True  # the app's, instead of ours
            elif lname == b"date":
                continue  # ours is the one the tick keeps right
            parts += (name, b": ", value, b"\r\n")
        if own_server:
            parts[1] = conn.state.date.without_server
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
        if not self.keep_alive or conn.state.draining:
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
        conn.write(b"".join(parts))

    # -- for zion's own handlers ---------------------------------------------

    def respond(self, status: int, body: bytes,
                content_type: bytes = b"text/plain; charset=utf-8",
                extra: Headers = ()) -> None:
        """Answer with a fixed body in one write and finish; `extra`: header pairs."""
        keep_alive = self.keep_alive and not self.conn.state.draining
        self.keep_alive = keep_alive
        self.status = status
        self.response_started = True
        self.written = 0 if self.head else len(body)
        self.conn.write(response.simple(status, body, self.conn.state.date, content_type,
                                        keep_alive=keep_alive, head=self.head,
                                        extra=response.header_lines(extra)))
        self.complete()

    def fail(self, status: int, detail: str, headers: Headers = ()) -> None:
        """An error answer that closes the connection."""
        self.keep_alive = False
        self.status = status
        self.response_started = True
        self.conn.write(response.error(status, self.conn.state.date, detail,
                                       response.header_lines(headers)))
        self.complete()

    def send_head(self, status: int, headers: Headers, content_length: int) -> None:
        """A response head (header pairs) with a known length; the body
        follows by write_raw."""
        keep_alive = self.keep_alive and not self.conn.state.draining
        self.keep_alive = keep_alive
        self.status = status
        self.response_started = True
        self.content_length = content_length
        self.conn.write(b"".join((
            response.status_line(status), self.conn.state.date.prefix,
            response.header_lines(headers),
            b"content-length: %d\r\n" % content_length if status not in _NO_BODY_STATUS else b"",
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
        )))

    def write_raw(self, data: bytes) -> None:
        self.written += len(data)
        self.conn.write(data)

    def complete(self) -> None:
        self.response_complete = True
        self._wake()
        if not self.disconnected:
            self.conn.exchange_done(self)

    # -- running the app -------------------------------------------------------

    def run(self, app: ASGIApp, background: set[asyncio.Task[Any]]) -> None:
        task = start_task(self.conn.loop, self._guarded(app))
        if not task.done():
            background.add(task)
            task.add_done_callback(background.discard)

    async def _guarded(self, app: ASGIApp) -> None:
        state = self.conn.state
        slot = state.slot
        inflight = slot.inflight + 1
        slot.inflight = inflight
        if inflight == 1 and state.heartbeat_slow:  # work again: the busy pace
            state.became_busy()
        try:
            await app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass  # the app noticed the client left; nothing to answer
        except Exception as exc:
            self._app_failed(exc)
        else:
            if not self.response_complete and not self.disconnected:
                if not self.response_started:
                    log.error("app_no_response", path=self.scope["path"])
                    self.fail(500, "")
                else:
                    log.error("app_incomplete_response", path=self.scope["path"])
                    self.conn.close()
        finally:
            slot.inflight -= 1

    def _app_failed(self, exc: Exception) -> None:
        if self.disconnected:
            # Most often the framework's own "client went away" (Starlette's
            # ClientDisconnect after our OSError): nobody is left to answer.
            log.debug("app_error_after_disconnect", path=self.scope["path"], error=repr(exc))
            return
        log.error("app_error", path=self.scope["path"], error=repr(exc),
                  exc_info=not isinstance(exc, ProtocolError))
        if self.content_length is None and not self.disconnected:
            self.fail(500, "")  # nothing written yet (maybe a refused header)
        elif not self.response_complete:
            self.conn.close()  # half a response: only closing tells the client
        # else: the app answered (Starlette sends its own 500) and then
        # re-raised; the connection is in a clean state and stays open.
