"""Back-pressure both ways: a slow reader pauses the writer, a slow app (or
a full write buffer) pauses reading - never growing memory instead.

Writing: the transport calls pause_writing() when its buffer passes the
high-water mark (limits.write_buffer_high); response writers await `drain()`
and resume when the kernel has taken the bytes.

Reading: one flag per reason (aiohttp's base_protocol.py keeps them apart
the same way). The transport stops reading when the first reason appears and
reads again only when none is left, so lifting one reason (the app read its
body) cannot undo another (the client does not read our answers).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from zion.http.wakeup import Wakeup


class PauseReason(enum.IntFlag):
    # The transport holds over write_buffer_high: a client that does not read
    # our answers must not make us read (and answer) more of its requests.
    WRITE_BUFFER_FULL = enum.auto()
    # HTTP/1.1: the app has not taken the request body buffered for it.
    BODY_UNREAD = enum.auto()
    # HTTP/1.1: a pipelined request waits for the one before it.
    PIPELINED = enum.auto()
    # HTTP/1.1: a request that ends the connection was read; nothing after it is.
    LAST_REQUEST = enum.auto()
    # HTTP/2: new streams' frames held while the old codec finishes (h2.py).
    HANDOVER = enum.auto()


class ReadPauses:
    """The reasons reading is paused; the transport reads while there is none.

    Reasons are kept as a plain int: IntFlag arithmetic goes through the enum
    machinery, about a microsecond per operation on the per-request path.
    Pass `int(PauseReason.X)` (or the member itself, off the hot path)."""

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: Any = None) -> None:
        self.reasons = 0
        self.transport = transport

    def pause(self, reason: int) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and self.transport is not None:
                self.transport.resume_reading()

    def named(self) -> PauseReason:
        return PauseReason(self.reasons)

    def __bool__(self) -> bool:
        return bool(self.reasons)


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
