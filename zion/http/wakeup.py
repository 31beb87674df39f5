"""A one-shot wake-up for one waiting coroutine: a Future made only when
someone waits, and dropped once set. Lighter than asyncio.Event on the
per-request path (no waiter set, no clear())."""

from __future__ import annotations

import asyncio


class Wakeup:
    __slots__ = ("_loop", "_future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """What to await until the next wake(); callers re-check their
        condition after. The Future is made now, not when the caller's Task
        first awaits it: asyncio.wait_for() wraps a coroutine in a Task that
        starts a loop turn later, and a wake() in between (an HTTP/2 app
        started inside the read whose next frame opens its window) was lost,
        leaving the writer parked until send_timeout. One a timeout
        cancelled is replaced."""
        future = self._future
        if future is None or future.done():
            future = self._future = self._loop.create_future()
        return future

    def wake(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)
