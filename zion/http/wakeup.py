"""A one-shot wake-up for the coroutines waiting on one condition: each
wait() gets a Future of its own, all set by the next wake(). Lighter than
asyncio.Event on the per-request path (no clear(), nothing kept between
wakes).

A Future of its own per waiter, not one shared: a Task cancelled while it
awaits a Future cancels that Future (asyncio Task.cancel cancels the Future
it waits on), so a shared one would cancel every other waiter with it. An
HTTP/2 connection's streams all wait in its drain while the write buffer is
full; one stream's --timeout-request (or a framework's cancel scope) must
not end the others."""

from __future__ import annotations

import asyncio

# Past this many waiters, those a timeout or a cancel already ended are
# dropped before one more is added: wait_for() in a loop leaves one each time.
_PRUNE_AT = 16


class Wakeup:
    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] | None = None

    def wait(self) -> asyncio.Future[None]:
        """What to await until the next wake(); callers re-check their
        condition after. The Future is made now, not when the caller's Task
        first awaits it: asyncio.wait_for() wraps a coroutine in a Task that
        starts a loop turn later, and a wake() in between (an HTTP/2 app
        started inside the read whose next frame opens its window) was lost,
        leaving the writer parked until send_timeout."""
        future = self._loop.create_future()
        waiters = self._waiters
        if waiters is None:
            self._waiters = [future]
        else:
            if len(waiters) >= _PRUNE_AT:
                waiters[:] = [w for w in waiters if not w.done()]
            waiters.append(future)
        return future

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        if waiters is not None:
            for future in waiters:
                if not future.done():
                    future.set_result(None)
