"""What every connection of one worker shares: settings, handlers, counters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from zion.config import Settings
from zion.http.response import DateCache
from zion.status_board import Slot

if TYPE_CHECKING:
    from zion.http.protocol import HttpProtocol
    from zion.static import StaticFiles

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]],
                    Callable[[Any], Awaitable[None]]], Awaitable[None]]


class ServerState:
    def __init__(
        self,
        settings: Settings,
        worker_index: int,
        loop: asyncio.AbstractEventLoop,
        app: ASGIApp | None,
        static: StaticFiles | None,
        slot: Slot,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.worker_index = worker_index
        self.loop = loop
        self.app = app
        self.static = static
        self.slot = slot
        self.status = status
        self.date = DateCache()
        self.connections: set[HttpProtocol] = set()
        # Handed to every ASGI scope as scope["state"] (filled by lifespan).
        self.lifespan_state: dict[str, Any] = {}
        self.draining = False
        self.requests_total = 0
        self.access_log = settings.log.access_log
        self.builtins = settings.server.builtins
        self.background: set[asyncio.Task[Any]] = set()

    def tick(self) -> None:
        """Once a second-ish: refresh Date, time out idle or slow connections."""
        self.date.refresh()
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_deadline(now)

    def connection_opened(self, conn: HttpProtocol) -> None:
        self.connections.add(conn)
        self.slot.conns = len(self.connections)

    def connection_closed(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        self.slot.conns = len(self.connections)
