"""The decisions HTTP/1.1, HTTP/2 and HTTP/3 must take alike, in one place.

No I/O here: plain functions over the worker's state, its limits and an
exchange. h1.py and h2.py call the same ones, so a rule added here (a
request timeout, load shedding) holds on both protocols at once, and they
cannot drift apart (issue 19: an HTTP/2 body over max_body_size was not
answered 413, max_connections and body_timeout did not exist on HTTP/2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from zion.http import access_log, forwarded

if TYPE_CHECKING:
    from zion.http.asgi_types import ASGIVersions, Extensions, HTTPScope
    from zion.http.exchange import Exchange
    from zion.http.state import ServerState
    from zion.settings import LimitsSettings as Limits


ASGI_VERSION: ASGIVersions = {"version": "3.0", "spec_version": "2.4"}


def http_scope(state: ServerState, http_version: str, method: str, path: str, raw_path: bytes,
               query: bytes, headers: list[tuple[bytes, bytes]],
               client: tuple[str, int] | None, server: tuple[str, int] | None,
               extensions: Extensions, proxied: bool) -> HTTPScope:
    """The ASGI http scope: the same keys on every protocol; client, scheme
    and server rewritten from the forwarding headers when the peer is a
    proxy we trust (`proxied`)."""
    scope: HTTPScope = {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": http_version,
        "server": server,
        "client": client,
        "scheme": state.scheme,  # "http" on a no-TLS listener (h2c included)
        "method": method,
        "root_path": state.root_path,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "state": state.lifespan_state.copy(),
        "extensions": extensions,
    }
    if proxied:
        assert state.proxies is not None
        forwarded.apply(scope, state.proxies)
    return scope


def http_scope_base(state: ServerState, client: tuple[str, int] | None,
                    server: tuple[str, int] | None) -> HTTPScope:
    """A connection's scope, made once by http_scope itself (the same keys,
    in the same order) with the keys of each request left to fill: a copy
    of it with those set costs less than building the dict again (HTTP/1.1,
    one connection, many requests: h1.py)."""
    return http_scope(state, "1.1", "", "", b"", b"", [], client, server, {}, False)


class Refusal(NamedTuple):
    """An answer zion gives instead of the app."""

    status: int
    detail: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def refuse(ex: Exchange, refusal: Refusal, cancel: Callable[[], None]) -> None:
    """A stream of HTTP/2 or HTTP/3 answered with `refusal` instead of by its
    app (a real response the client sees), or `cancel()`led (the protocol's
    stream reset) if the app has begun answering; either way the app's
    receive() returns http.disconnect, so its task ends."""
    if ex.response_started:
        cancel()
    else:
        ex.fail(refusal.status, refusal.detail, refusal.headers)
    ex.lost()


def over_connections(state: ServerState) -> bool:
    """A new connection past max_connections: its requests get 503 (asked
    once, when the connection is made, on both protocols)."""
    return len(state.connections) > state.limits.max_connections


def admit_request(state: ServerState, overloaded: bool) -> Refusal | None:
    """Whether a parsed request may reach the handlers. The place for any
    rule that refuses by load (503 + Retry-After by requests in flight).
    HTTP/2 does not ask (head_refusal) for a request on a connection that is
    not `overloaded` whose head declares no length and has an origin-form
    target (h2.py, its hot path): a rule that refuses such a request too
    widens that test. HTTP/1.1 asks only for a request on an `overloaded`
    connection (h1.py start_next): a rule that refuses others too makes it
    ask for every request."""
    if overloaded:
        return Refusal(503, "worker at max_connections")
    return None


def declared_length(limits: Limits, value: bytes) -> int | Refusal:
    """A request's content-length header: the length, or why it is refused.
    Checked before any of the body is read (RFC 9110 15.5.14: 413)."""
    try:
        length = int(value)
    except ValueError:
        return Refusal(400, "bad content-length")
    if length < 0:
        return Refusal(400, "bad content-length")
    if 0 < limits.max_body_size < length:  # 0: no limit
        return _too_large(limits)
    return length


def body_chunk(limits: Limits, received: int, size: int) -> Refusal | None:
    """`size` more body bytes after `received`: over max_body_size?"""
    if 0 < limits.max_body_size < received + size:  # 0: no limit
        return _too_large(limits)
    return None


def _too_large(limits: Limits) -> Refusal:
    return Refusal(413, f"body larger than {limits.max_body_size} bytes")


def body_deadline(limits: Limits, now: float) -> float:
    """When a request body that has stopped arriving is given up (408)."""
    return now + limits.body_timeout


BODY_TIMED_OUT = Refusal(408, "request body not received in time")


# Less connection window than this left to the client is no window: a client
# waits for room for a whole frame (HTTP/2's default SETTINGS_MAX_FRAME_SIZE)
# rather than send a sliver.
WINDOW_SHUT = 16384


def body_wait(limits: Limits, ex: Exchange, now: float, withheld_at: float) -> float:
    """A request body's deadline has passed (HTTP/2, HTTP/3): the next one
    while its app holds body it has not read (the stream's window is shut
    for it: the wait is the app's, not the client's) or while zion withholds
    the connection's window (past limits.unread_body_per_worker: the wait is
    the worker's). `withheld_at`: the last of the worker's ticks that saw the
    connection's window shut by zion (0.0: never); the client has
    body_timeout from then, so a window given back between two ticks is not
    a 408 at the next. Else 0.0: the client stopped sending while it had
    window, BODY_TIMED_OUT."""
    if ex.body_size:
        return body_deadline(limits, now)
    deadline = body_deadline(limits, withheld_at)
    return deadline if deadline > now else 0.0


def over_unread_budget(state: ServerState) -> bool:
    """Whether the worker's HTTP/2 and HTTP/3 connections together hold more
    request body their apps have not read than limits.unread_body_per_worker."""
    return state.unread_body > state.limits.unread_body_per_worker


def unread_withheld(state: ServerState, was: int, unread: int) -> int:
    """A connection's request body its apps have not read is now `unread`
    bytes (it was `was`): the worker's count (state.unread_body) brought up
    to date, and what of it the connection's window withholds (HTTP/2,
    HTTP/3): nothing while the worker is within its budget, since each
    stream's own window already bounds what its app holds (an app that does
    not read stalls no other request); all of it past the budget, so the
    clients that fill apps which do not read wait, not the worker's memory."""
    state.unread_body += unread - was
    return unread if over_unread_budget(state) else 0


def bad_target(raw_path: bytes, method: bytes) -> Refusal | None:
    """RFC 9112 3.2 / RFC 9113 8.3.1: an origin-form target starts with '/'
    ('*' only for OPTIONS); anything else is 400 on both protocols."""
    if raw_path[:1] == b"/" or (raw_path == b"*" and method == b"OPTIONS"):
        return None
    return Refusal(400, "invalid request target")


def head_refusal(state: ServerState, overloaded: bool, length: bytes | None, raw_path: bytes,
                 method: bytes) -> Refusal | None:
    """What a request head of HTTP/2 or HTTP/3 is answered instead of by its
    app, in this order on both: the load (admit_request), a declared
    content-length that is bad or over max_body_size (413 before a body byte
    is read), a target that is not origin-form (400). A CONNECT's target is
    not checked here: plain CONNECT has none (RFC 9113 8.5, RFC 9114 4.4), and
    each protocol answers an extended CONNECT it does not serve with 501."""
    refusal = admit_request(state, overloaded)
    if refusal is not None:
        return refusal
    if length is not None:
        declared = declared_length(state.limits, length)
        if type(declared) is Refusal:
            return declared
    # An origin-form target, nearly every request's, needs no call.
    if raw_path[:1] != b"/" and method != b"CONNECT":
        return bad_target(raw_path, method)
    return None


def request_done(state: ServerState, ex: Exchange) -> None:
    """Accounting for one answered request, then its access log record
    (formatted by access_log.py)."""
    state.requests_total += 1
    # state.count_response, without its call on every request.
    counters = state.counters
    counters.requests += 1
    status = ex.status
    if status >= 400:
        if status >= 500:
            counters.responses_5xx += 1
        else:
            counters.responses_4xx += 1
    if state.access_log:
        scope = ex.scope
        access_log.write(access_log.AccessRecord(
            scope["method"], scope["path"], scope["query_string"], ex.status, ex.written,
            scope["client"], scope["http_version"], time.monotonic() - ex.started_at,
            scope["scheme"], scope["headers"]))
