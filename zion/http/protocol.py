"""HTTP/1.1 connection protocol over httptools (llhttp).

Connection state (transport, timers, pipeline) is kept apart from request
state (RequestCycle). Limits are enforced while parsing: a request line over
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
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from zion.http import response
from zion.http.cycle import RequestCycle
from zion.http.flow_control import FlowControl
from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.state import ServerState

log = get_logger("zion.http")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
# Deadline kinds.
_NONE, _FIRST, _HEADERS, _IDLE = 0, 1, 2, 3


class _Reject(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        # connection
        "state", "loop", "limits", "transport", "flow", "parser", "client", "server",
        "read_paused", "closing", "deadline", "deadline_kind", "cycle", "pipeline",
        "overloaded", "upgrade_seen", "served",
        # request being parsed
        "url", "headers", "header_bytes", "header_raw", "in_headers", "began_in_chunk",
        "parsing", "expect_100", "content_length",
    )

    def __init__(self, state: ServerState) -> None:
        # connection state
        self.state = state
        self.loop = state.loop
        self.limits = state.limits
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl(self.loop)
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.read_paused = False
        self.closing = False
        self.deadline = 0.0
        self.deadline_kind = _NONE
        self.cycle: RequestCycle | None = None  # the one being answered
        self.pipeline: deque[RequestCycle] = deque()  # parsed, waiting their turn
        self.overloaded = False
        self.upgrade_seen = False
        self.served = 0
        # request being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.header_raw = 0
        self.in_headers = False
        self.began_in_chunk = False
        self.parsing: RequestCycle | None = None
        self.expect_100 = False
        self.content_length = 0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass.
        tr: Any = transport
        self.transport = tr
        tr.set_write_buffer_limits(high=self.limits.write_buffer_high)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if peer else None
        self.server = (sock[0], sock[1]) if sock else None
        state = self.state
        state.connection_opened(self)
        if len(state.connections) > self.limits.max_connections:
            self.overloaded = True
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_kind = _FIRST

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.state.connection_closed(self)
        if self.cycle is not None:
            self.cycle.lost()
        for cycle in self.pipeline:
            cycle.lost()
        self.flow.connection_lost()
        self.deadline_kind = _NONE

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.began_in_chunk = False
        was_in_headers = self.in_headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades (WebSocket, h2c): answer over HTTP/1.1 and
            # close, because the parser stops at the upgrade point.
            self.upgrade_seen = True
            if self.parsing is not None:
                self.parsing.keep_alive = False
            for cycle in self.pipeline:
                cycle.keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Reject):
                self.reject(cause.status, cause.detail)
            else:
                log.error("parser_callback_error", error=repr(cause))
                self.reject(500, "")
            return
        except httptools.HttpParserError as exc:
            self.reject(400, _parser_detail(exc))
            return
        if self.in_headers:
            # httptools buffers a partial header line itself and reports it
            # only once complete, so bound the raw bytes of an unfinished
            # header section here (one read of slack when it began mid-chunk).
            if was_in_headers and not self.began_in_chunk:
                self.header_raw += len(data)
            if self.header_raw > self.limits.max_header_size + self.limits.max_request_line:
                self.reject(431, "header section too large")
                return
        if self.cycle is None and self.pipeline:
            self.start_next()

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.header_raw = 0
        self.in_headers = True
        self.began_in_chunk = True
        self.expect_100 = False
        self.content_length = 0
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_kind = _HEADERS

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_size:
            raise _Reject(431, "header section too large")
        if len(self.headers) >= self.limits.max_headers:
            raise _Reject(431, "too many header fields")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        elif name == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                raise _Reject(400, "bad content-length") from None
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.deadline_kind = _NONE
        if self.content_length > self.limits.max_body_size:
            raise _Reject(413, f"body larger than {self.limits.max_body_size} bytes")
        parser = self.parser
        url = self.url
        if b"?" in url or b"%" in url or not url.startswith(b"/"):
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Reject(400, "invalid request target") from None
            raw_path = parsed.path or b"/"
            query = parsed.query or b""
        else:
            raw_path, query = url, b""
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise _Reject(400, "non-ASCII request target") from None
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "server": self.server,
            "client": self.client,
            "scheme": "https",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": self.state.lifespan_state.copy(),
        }
        cycle = RequestCycle(self, scope, parser.should_keep_alive(), self.expect_100,
                             self.loop.time())
        self.parsing = cycle
        self.pipeline.append(cycle)
        if self.cycle is not None or len(self.pipeline) > 1:
            # Pipelined: hold further input until earlier answers are out.
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        if cycle.body_size + len(body) > self.limits.max_body_size:
            raise _Reject(413, f"body larger than {self.limits.max_body_size} bytes")
        if not cycle.response_complete:
            cycle.feed_body(body)

    def on_message_complete(self) -> None:
        cycle = self.parsing
        self.parsing = None
        if cycle is not None:
            cycle.message_complete()

    # -- request dispatch -----------------------------------------------------

    def start_next(self) -> None:
        if self.cycle is not None or not self.pipeline or self.closing:
            return
        cycle = self.cycle = self.pipeline.popleft()
        state = self.state
        path = cycle.scope["path"]
        if state.builtins and (path == "/healthz" or path.startswith("/_zion/")):
            from zion import builtin
            builtin.respond(self, cycle)
        elif self.overloaded:
            self.send_error(503, "worker at max_connections", cycle)
        elif state.static is not None and state.static.wants(cycle, has_app=state.app is not None):
            state.static.serve(self, cycle)
        elif state.app is not None:
            cycle.run(state.app)
        else:
            from zion import builtin
            builtin.default_page(self, cycle)

    def respond(self, cycle: RequestCycle, status: int, body: bytes,
                content_type: bytes = b"text/plain; charset=utf-8", extra: bytes = b"") -> None:
        """Answer `cycle` with a fixed body in one write and finish it."""
        keep_alive = cycle.keep_alive and not self.state.draining
        cycle.keep_alive = keep_alive
        cycle.status = status
        cycle.response_started = True
        cycle.written = 0 if cycle.head else len(body)
        self.write(response.simple(status, body, self.state.date, content_type,
                                   keep_alive=keep_alive, head=cycle.head, extra=extra))
        cycle.response_complete = True
        self.response_done(cycle)

    def send_error(self, status: int, detail: str, cycle: RequestCycle | None = None) -> None:
        self.write(response.error(status, self.state.date, detail))
        if cycle is not None:
            cycle.status = status
            cycle.keep_alive = False
            cycle.response_started = cycle.response_complete = True
            self.response_done(cycle)

    def response_done(self, cycle: RequestCycle) -> None:
        state = self.state
        state.requests_total += 1
        self.served += 1
        if state.access_log:
            self._access_log(cycle)
        if self.cycle is cycle:
            self.cycle = None
        if (not cycle.keep_alive or state.draining or self.upgrade_seen
                or not cycle.body_complete):
            # A body the app never read would have to be drained first; closing
            # is cheaper and keeps the next request's framing unambiguous.
            self.close()
            return
        if self.pipeline:
            self.loop.call_soon(self.start_next)
            return
        self.deadline = self.loop.time() + self.limits.keepalive_timeout
        self.deadline_kind = _IDLE
        self.resume_reading()

    def _access_log(self, cycle: RequestCycle) -> None:
        scope = cycle.scope
        log.info("access", method=scope["method"], path=scope["path"], status=cycle.status,
                 bytes=cycle.written, client=self.client[0] if self.client else None,
                 ms=round((self.loop.time() - cycle.started_at) * 1000, 2))

    # -- connection control ---------------------------------------------------

    def reject(self, status: int, detail: str) -> None:
        """Refuse the request being parsed and close the connection."""
        if self.cycle is None or not self.cycle.response_started:
            self.write(response.error(status, self.state.date, detail))
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None:
                cycle.lost()
        self.close()

    def check_deadline(self, now: float) -> None:
        if self.deadline_kind == _NONE or now < self.deadline or self.closing:
            return
        if self.deadline_kind == _HEADERS:
            self.reject(408, "header section not received in time")
        else:
            self.close()  # idle keep-alive, or a connection that never spoke

    def shutdown(self) -> None:
        """Drain: finish what is in flight, then close.

        An idle keep-alive connection is closed now (clients retry those). A
        new one that has not sent its first request yet is not idle: its
        request is on the way, so it is answered, with `connection: close`."""
        if self.cycle is None and not self.pipeline and self.parsing is None and self.served:
            self.close()

    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline_kind = _NONE
            if self.transport is not None:
                self.transport.close()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closing and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closing and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()


def _parser_detail(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 120 else text[:117] + "..."
