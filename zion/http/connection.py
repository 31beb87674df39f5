"""What an exchange may ask of the connection that carries it.

HTTP/1.1 implements this today and HTTP/2 streams will tomorrow; an exchange
never reaches past it into a protocol class.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from zion.http.exchange import Exchange
    from zion.http.state import ServerState


def endpoints(transport: asyncio.BaseTransport
              ) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """(client, server) addresses of a connection, as ASGI scopes carry them."""
    peer = transport.get_extra_info("peername")
    sock = transport.get_extra_info("sockname")
    # A Unix socket (--uds) names paths, not (host, port): ASGI's None.
    return ((peer[0], peer[1]) if isinstance(peer, tuple) else None,
            (sock[0], sock[1]) if isinstance(sock, tuple) else None)


class ClientDisconnected(OSError):
    """ASGI spec 2.4: `send()` on a connection the client has closed.

    An OSError subclass, as the spec asks, so frameworks that listen for it
    (Starlette >= 0.40 skips its own disconnect poller on spec 2.4) stop the
    response instead of streaming into the void.
    """


class Connection(Protocol):
    state: ServerState
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    server: tuple[str, int] | None

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer; a no-op once the connection is closing."""

    async def drain(self) -> None:
        """Return once the peer has taken enough that writing may go on."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is complete: log it, then serve the next one or close."""

    def close(self) -> None:
        """Close now; a half-written response can only be ended this way."""
