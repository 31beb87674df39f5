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

    async def wait(self) -> None:
        """Until the next wake(); callers re-check their condition after."""
        if self._future is None:
            self._future = self._loop.create_future()
        await self._future

    def wake(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)
