"""Write back-pressure: a slow reader pauses the writer, never grows memory.

The transport calls pause_writing() when its buffer passes the high-water
mark (limits.write_buffer_high); response writers await `drain()` and resume
when the kernel has taken the bytes.
"""

from __future__ import annotations

import asyncio

from zion.http.wakeup import Wakeup


class FlowControl:
    __slots__ = ("_drained", "write_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drained = Wakeup(loop)
        self.write_paused = False

    async def drain(self) -> None:
        while self.write_paused:
            await self._drained.wait()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drained.wake()

    def connection_lost(self) -> None:
        # Writers blocked on a dead connection must wake to see it is gone.
        self.write_paused = False
        self._drained.wake()
