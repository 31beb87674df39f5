"""Write back-pressure: a slow reader pauses the writer, never grows memory.

The transport calls pause_writing() when its buffer passes the high-water
mark (limits.write_buffer_high); response writers await `drain()` and resume
when the kernel has taken the bytes.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("_loop", "_waiter", "write_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.write_paused = False

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self._waiter is None:
            self._waiter = self._loop.create_future()
        await self._waiter

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def connection_lost(self) -> None:
        # Writers blocked on a dead connection must wake to see it is gone.
        self.write_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
