"""Per-request limits both protocols apply the same way: load shedding
(--limit-concurrency) and the request timeout (--timeout-request).

The decisions are plain functions of counts, times and flags, with no
socket and no loop. `admit` and `run_with_deadline` are the one hook: the
worker's handler chain (zion/worker.py) calls them for every request that
reaches the app or the static files, and HTTP/1.1 and HTTP/2 requests both
pass there (h1.py and h2.py hand each exchange to `state.dispatch`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import (
        ASGIApp,
        ASGIReceiveCallable,
        ASGISendCallable,
        HTTPSendEvent,
        Scope,
    )
    from zion.http.exchange import Exchange
    from zion.settings import LimitsSettings

log = get_logger("zion.http")



# -- load shedding -------------------------------------------------------------

class Shed(NamedTuple):
    """An answer instead of the app: 503 with Retry-After (RFC 9110 10.2.3:
    "how long the user agent ought to wait before making a follow-up
    request"), at once: a request past the limit never waits in a queue."""

    detail: bytes
    retry_after: int
    close: bool  # too many connections: this one is closed after the answer


def shed(limits: LimitsSettings, connections: int, inflight: int) -> Shed | None:
    """`connections`: open on this worker, the asking one included;
    `inflight`: requests being answered (`InFlight`), this one not yet. Past
    `limits.concurrency` of either (uvicorn's --limit-concurrency: connections
    or requests), the request is shed. Existing connections keep being served
    up to the limit; the one connection too many is answered and closed."""
    limit = limits.concurrency
    if not limit:
        return None
    if connections > limit:
        return Shed(b"overloaded: too many connections, retry later\n", limits.retry_after, True)
    if inflight >= limit:
        return Shed(b"overloaded: too many requests in flight, retry later\n",
                    limits.retry_after, False)
    return None


class InFlight:
    """Requests the app or the static files are answering: from dispatch
    until the response is complete or the client is gone, or the task ends.

    Not the number of app tasks (uvicorn's rule): a task can outlive its
    response (a background task, the framework's teardown), and a client that
    sends its next request as soon as the last response ended would find its
    own finished request still counted and get a 503. Counted from dispatch,
    not from the task's first step, so requests that arrive in one read are
    counted one by one."""

    __slots__ = ("_answering",)

    def __init__(self) -> None:
        self._answering: set[Exchange] = set()

    def enter(self, ex: Exchange) -> None:
        self._answering.add(ex)

    def leave(self, ex: Exchange) -> None:
        self._answering.discard(ex)

    def busy(self, limit: int) -> int:
        """How many are being answered: exact once it reaches `limit`, an
        upper bound below it. The completed ones are swept only at the limit,
        so a check below it costs O(1) and the set stays near `limit`."""
        if len(self._answering) >= limit:
            self._sweep()
        return len(self._answering)

    def count(self) -> int:
        self._sweep()
        return len(self._answering)

    def _sweep(self) -> None:
        done = [ex for ex in self._answering if ex.response_complete or ex.disconnected]
        self._answering.difference_update(done)

    def counted(self, app: ASGIApp, ex: Exchange) -> ASGIApp:
        """The app, for this one exchange, leaving the count when its task
        ends (an app that returns without a complete response)."""

        async def run(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
                      ) -> None:
            try:
                await app(scope, receive, send)
            finally:
                self.leave(ex)

        return run


def at_limit(concurrency: int, connections: int, inflight: int) -> bool:
    """Whether a new connection's request would be shed now (readiness, the
    HAProxy agent, status): the same rule as `shed`, for a connection that
    is not open yet."""
    return bool(concurrency) and (connections + 1 > concurrency or inflight >= concurrency)


def admit(ex: Exchange, limits: LimitsSettings, connections: int, inflight: InFlight) -> bool:
    """Answer a shed request (503 + Retry-After) and say False; or True."""
    refusal = shed(limits, connections, inflight.busy(limits.concurrency))
    if refusal is None:
        return True
    if refusal.close:
        ex.keep_alive = False
    ex.respond(503, refusal.detail, extra=((b"retry-after", b"%d" % refusal.retry_after),))
    return False


# -- request timeout -----------------------------------------------------------

class Expiry(Enum):
    """What a request timeout does to the exchange it caught."""

    RESPOND_504 = "504"  # nothing on the wire yet: a Gateway Timeout answer
    ABORT = "closed"  # a response head (or part of a body) is out: only closing tells


def expiry(head_written: bool) -> Expiry:
    return Expiry.ABORT if head_written else Expiry.RESPOND_504


def streaming(message: HTTPSendEvent) -> bool:
    """A body chunk with more to come: the response streams, and from here on
    send_timeout (a client that stops reading) governs it, not the request
    timeout (a long stream is not a slow app)."""
    return message["type"] == "http.response.body" and bool(message.get("more_body"))


def with_deadline(app: ASGIApp, ex: Exchange, seconds: float) -> ASGIApp:
    """The app, for this one exchange, under --timeout-request."""

    def timed(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
              ) -> Awaitable[None]:
        return run_with_deadline(app, ex, seconds, scope, receive, send)

    return timed


async def run_with_deadline(app: ASGIApp, ex: Exchange, seconds: float,
                            scope: Scope, receive: ASGIReceiveCallable,
                            send: ASGISendCallable) -> None:
    """Run the app under --timeout-request. At the deadline its task is
    cancelled (the app sees CancelledError where it awaits) and the client
    gets 504, or, once a head is out, its connection (HTTP/2: its stream) is
    reset. A streaming response disarms the deadline at its first chunk."""
    deadline = asyncio.timeout(seconds)

    async def watched(message: HTTPSendEvent) -> None:
        if streaming(message) and deadline.when() is not None:
            deadline.reschedule(None)
        await send(message)

    try:
        async with deadline:
            await app(scope, receive, watched)
    except TimeoutError:
        if not deadline.expired():
            raise  # the app's own, not ours
    # Expired: the app re-raised the CancelledError (the context manager made
    # it TimeoutError), or it swallowed it and returned.
    if deadline.expired():
        timed_out(ex, seconds)


def timed_out(ex: Exchange, seconds: float) -> None:
    if ex.response_complete or ex.disconnected:
        return
    # `content_length` is set when the head goes out (both protocols).
    action = expiry(ex.content_length is not None)
    log.warning("request_timeout", path=ex.scope["path"], timeout_s=seconds,
                http_version=ex.scope["http_version"], answer=action.value)
    if action is Expiry.RESPOND_504:
        ex.fail(504, f"the application did not answer within {seconds:g} s")
    else:
        ex.conn.close()
        ex.lost()  # nobody is left to answer: the exchange ends here
