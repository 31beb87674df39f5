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
import http
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from zion.http import files, task_start
from zion.http.connection import ClientDisconnected
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import (
        HTTPReceiveEvent,
        HTTPRequestEvent,
        HTTPResponseBodyEvent,
        HTTPResponseStartEvent,
        HTTPResponseTrailersEvent,
        HTTPScope,
        HTTPSendEvent,
    )
    from zion.http.connection import Carrier
    from zion.http.state import ASGIApp

log = get_logger("zion.http")

_NO_BODY_STATUS = frozenset({204, 304})
# Connection-specific fields (RFC 9110 7.6.1; forbidden over HTTP/2, RFC 9113
# 8.2.2): each protocol frames the connection its own way.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade", b"te"})
# The app's header fields the exchange looks at rather than passing on as
# they are: the framing ones, and `date`, which the carrier adds as the
# worker's tick keeps it.
_FRAMED = _CONNECTION_SPECIFIC | {b"content-length", b"date", b"server"}
# The app's field names in lowercase, by the name as it sent them: an app
# sends the same few names over and over, and a lookup of the same bytes
# object (its hash kept) costs less than lowering a copy and hashing that.
# Bounded; when full it starts over.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX, _NAME_MAX = 512, 64
# The app's content-length values as ints, by the value as it sent them:
# frameworks send one per response, most often the same few, and int() on
# bytes costs ~0.7k instructions, a lookup of the same object (its hash kept)
# a fraction of that. Bounded; when full it starts over.
_LENGTHS: dict[bytes, int] = {}
_LENGTHS_MAX, _LENGTH_MAX = 512, 20
# Header pairs, as zion's own handlers give them (lowercase names).
Headers = Sequence[tuple[bytes, bytes]]
# Request Tasks are made by this class directly while no task factory is set.
_Task = asyncio.Task
# Body bytes buffered for an app that has not read them; past this the
# connection stops reading from the socket until the app catches up.
_BODY_HIGH_WATER = 65536


class ProtocolError(Exception):
    """The app broke the ASGI contract (bad message, bad header)."""


def _lower(name: bytes) -> bytes:
    lname = name.lower()
    if type(name) is bytes and len(name) <= _NAME_MAX:
        if len(_NAMES) >= _NAMES_MAX:
            _NAMES.clear()
        _NAMES[name] = lname
    return lname


def _length(value: bytes) -> int:
    """An app's content-length value as an int (cached if short), or ProtocolError."""
    try:
        length = int(value)
    except ValueError:
        raise ProtocolError(f"invalid content-length {value!r}") from None
    if type(value) is bytes and len(value) <= _LENGTH_MAX:
        if len(_LENGTHS) >= _LENGTHS_MAX:
            _LENGTHS.clear()
        _LENGTHS[value] = length
    return length


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Exchange:
    __slots__ = (
        "conn", "scope", "keep_alive", "head", "expect_100", "started_at",
        # request body, fed by the connection
        "body", "body_size", "received", "body_complete", "body_delivered", "waiter",
        "disconnected",
        # response
        "response_started", "response_complete", "status", "headers", "content_length",
        "written", "bodyless", "want_trailers", "trailers",
        # the app's Task and the set that keeps it referenced (run)
        "task", "background",
    )

    def __init__(self, conn: Carrier, scope: HTTPScope, keep_alive: bool,
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
        # The app's task waits on it (receive); made only when it has to wait:
        # most requests never do (a one-shot Future, as wakeup.Wakeup is).
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        # response
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.headers: Iterable[tuple[bytes, bytes]] = ()  # the app's, as it sent them
        # None until the head is out; then the length it declared, -1: none.
        self.content_length: int | None = None
        self.written = 0  # body bytes sent
        self.bodyless = False  # HEAD, 1xx, 204, 304: the body is not sent (RFC 9110 6.4.1)
        self.want_trailers = False
        self.trailers: list[tuple[bytes, bytes]]  # made when the app asks for trailers
        self.task: asyncio.Task[None] | None = None
        self.background: set[asyncio.Task[Any]] | None = None

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
        if self.waiter is not None:  # most requests never wait: no call for them
            self._wake()

    def lost(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI receive ----------------------------------------------------------

    async def receive(self) -> HTTPReceiveEvent:
        while not self.body_delivered and not self.disconnected:
            if self.body or self.body_complete:
                return self._take_body()
            if self.expect_100 and not self.response_started:
                self.expect_100 = False
                self.conn.send_continue()
            self.conn.resume_reading()
            await self._wait()
        # Body delivered: per ASGI, receive() now waits for the response to
        # finish or the client to leave.
        while not self.disconnected and not self.response_complete:
            await self._wait()
        return {"type": "http.disconnect"}

    def _take_body(self) -> HTTPRequestEvent:
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
        """Until the next _wake(); callers re-check their condition after."""
        if self.waiter is None:
            self.waiter = self.conn.loop.create_future()
        await self.waiter

    # -- ASGI send -------------------------------------------------------------

    async def send(self, message: HTTPSendEvent) -> None:
        # `kind` picks the branch; mypy narrows a TypedDict union only on
        # message["type"] itself, so each branch names its member (a local
        # name, no cast() call on the request path).
        kind = message["type"]
        if kind == "http.response.body":
            body_event: HTTPResponseBodyEvent = message  # type: ignore[assignment]
            if not self.response_started:
                raise ProtocolError("http.response.body sent before http.response.start")
            if self.disconnected or self.response_complete:  # the flags first: no call
                self._check_open(kind)
            more = body_event.get("more_body", False)
            body = body_event.get("body", b"")
            # With trailers coming, the trailers end the response, not the body.
            end = not more and not self.want_trailers
            if self.content_length is None:
                self._start(body, end)
            elif not self.bodyless and (body or end):
                self.written += len(body)
                self.conn.send_body(body, end)
            if more:
                await self.conn.drain()
            elif end:
                self.complete()
            return
        if kind == "http.response.start":
            if self.response_started:
                raise ProtocolError("http.response.start sent twice")
            if self.disconnected or self.response_complete:
                self._check_open(kind)
            start: HTTPResponseStartEvent = message  # type: ignore[assignment]
            self.response_started = True
            status = start["status"]
            # int() only for what is not an int already (an IntEnum such as
            # HTTPStatus): calling it on one costs ~0.2k instructions.
            self.status = status if type(status) is int else int(status)
            self.headers = start.get("headers", ())
            if start.get("trailers", False):
                self.want_trailers = True
                self.trailers = []
            return
        if kind == "http.response.trailers":
            await self._trailers(message)  # type: ignore[arg-type]
            return
        if kind == files.PATHSEND:
            if not self.response_started or self.content_length is not None:
                raise ProtocolError("http.response.pathsend must follow http.response.start")
            self._check_open(kind)
            await files.pathsend(self, message)  # type: ignore[arg-type]
            return
        raise ProtocolError(f"unexpected ASGI message type {kind!r}")

    def _check_open(self, kind: str) -> None:
        if self.disconnected:
            raise ClientDisconnected(f"client disconnected before {kind}")
        if self.response_complete:
            raise ProtocolError(f"{kind} after the response was complete")

    async def _trailers(self, message: HTTPResponseTrailersEvent) -> None:
        if not self.want_trailers or self.response_complete:
            raise ProtocolError("http.response.trailers without trailers: true")
        self._check_open("http.response.trailers")
        if self.content_length is None:
            self._start(b"", False)  # no body message came: the head goes now
        self.trailers += [(n.lower(), v) for n, v in message.get("headers", ())
                          if n.lower() not in _CONNECTION_SPECIFIC]
        if not message.get("more_trailers", False):
            self.want_trailers = False
            if not self.bodyless:
                self.conn.send_trailers(self.trailers)
            self.complete()

    def _start(self, body: bytes, end: bool) -> None:
        """The response head as header pairs (lowercase names; no content-length,
        date or connection-specific fields, RFC 9110 7.6.1 / RFC 9113 8.2.2:
        each protocol frames the length and the connection its own way)."""
        status = self.status
        headers = []
        length = None
        own_server = False
        names = _NAMES
        for name, value in self.headers:
            lname = names.get(name)
            if lname is None:
                lname = _lower(name)
            if lname in _FRAMED:
                if lname == b"content-length":
                    try:
                        length = _LENGTHS.get(value)
                    except TypeError:  # a bytearray: not cached
                        length = None
                    if length is None:
                        length = _length(value)
                elif lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                elif lname == b"server":
                    own_server = True  # the app's, instead of ours
                    headers.append((lname, value))
                continue
            headers.append((lname, value))
        # RFC 9110 6.4.1: no content in a HEAD answer, a 1xx, a 204 or a 304.
        if status in _NO_BODY_STATUS or status < 200:
            self.bodyless = True
            if status != 304:
                length = None  # RFC 9110 8.6: never with 1xx or 204
        elif length is None and end:
            length = len(body)
        if self.head:
            self.bodyless = True
        if self.bodyless:
            body = b""
        # A refused header raises here, before the head counts as written:
        # the app's failure is then answered with a 500.
        self.conn.start_response(status, headers, length, body, end, own_server)
        self.content_length = -1 if length is None else length
        self.written = len(body)  # the first body bytes

    # -- for zion's own handlers ---------------------------------------------

    def respond(self, status: int, body: bytes,
                content_type: bytes = b"text/plain; charset=utf-8",
                extra: Headers = ()) -> None:
        """Answer with a fixed body in one write and finish; `extra`: header pairs."""
        self.status = status
        self.response_started = True
        self.content_length = length = len(body)
        if self.head:
            self.bodyless = True
            body = b""
        self.written = len(body)
        self.conn.start_response(status, [(b"content-type", content_type), *extra], length,
                                 body, True, False)
        self.complete()

    def fail(self, status: int, detail: str, headers: Headers = ()) -> None:
        """An error answer that closes the connection (HTTP/1.1; the stream, HTTP/2)."""
        self.keep_alive = False
        text = f"{status} {_phrase(status)}" + (f": {detail}" if detail else "") + "\n"
        self.respond(status, text.encode(), extra=headers)

    def send_head(self, status: int, headers: Headers, content_length: int) -> None:
        """A response head (header pairs) with a known length; the body
        follows by write_raw, then complete()."""
        self.status = status
        self.response_started = True
        self.content_length = content_length
        self.bodyless = self.head or status in _NO_BODY_STATUS
        self.conn.start_response(status, list(headers),
                                 None if status in _NO_BODY_STATUS else content_length,
                                 b"", False, False)

    def write_raw(self, data: bytes) -> None:
        """Body bytes after send_head."""
        self.written += len(data)
        self.conn.send_body(data, False)

    def complete(self) -> None:
        self.response_complete = True
        if self.waiter is not None:
            self._wake()
        if not self.disconnected:
            self.conn.exchange_done(self)

    # -- running the app -------------------------------------------------------

    def run(self, app: ASGIApp, background: set[asyncio.Task[Any]]) -> None:
        # Kept in `background` (drain waits for it, and cancels what is left)
        # until its own last step leaves it (_guarded's finally): no done
        # callback, which costs every request a Handle and a trip through
        # the loop's ready queue once the Task has finished.
        # HTTP/1.1: its first step runs now (task_start), so an app that
        # answers at once writes before the connection's read ends, and a
        # new TLS connection's session tickets and the response leave in one
        # write. HTTP/2 and /3 dispatch amid their codec's events, which an
        # app's writes and closes may not re-enter: the next loop turn.
        conn = self.conn
        loop = conn.loop
        coro = self._guarded(app)
        if conn.start_now:
            task = task_start.start(loop, coro)
            if task.done():
                return
        elif conn.state.plain_tasks:
            # What loop.create_task makes while no task factory is set (a
            # "Task-N", registered for all_tasks, in a copy of the context),
            # without create_task's wrapper (keyword parsing, a closed check
            # that call_soon makes again, a name step for no name) or a
            # get_task_factory() call: bench/conn_instructions.py --shape
            # keepalive 99.9k -> 98.6k instructions a request. The worker's
            # loop keeps the flag (worker.WorkerLoop).
            task = _Task(coro, loop=loop)
        else:  # an app's task factory makes every Task, ours too
            task = loop.create_task(coro)
        self.task = task
        self.background = background
        background.add(task)

    async def _guarded(self, app: ASGIApp) -> None:
        state = self.conn.state
        inflight = state.inflight + 1
        state.inflight = inflight
        state.slot.inflight = inflight  # a store into shared memory, no read back
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
            inflight = state.inflight - 1
            state.inflight = inflight
            state.slot.inflight = inflight
            if self.background is not None:
                self.background.discard(self.task)  # type: ignore[arg-type]

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
