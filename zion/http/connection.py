"""What an exchange may ask of what carries it (the HTTP/1.1 connection, an
HTTP/2 stream): response events with header pairs, back-pressure, reading
paused or resumed, done. An exchange never reaches past it into a protocol
class, and never sees wire bytes.
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


class Carrier(Protocol):
    """What carries one exchange: the HTTP/1.1 connection, an HTTP/2 stream
    (an HTTP/3 stream next). The exchange speaks in these events - header
    pairs and body bytes, never wire bytes; each carrier frames them its own
    way (status line and chunked coding; HEADERS and DATA frames)."""

    state: ServerState
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    # The exchange's Task runs its first step inside dispatch (task_start):
    # the carrier takes the app's writes, its end and a close from there.
    start_now: bool

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]],
                       length: int | None, body: bytes, end: bool, own_server: bool) -> None:
        """The response head and its first body bytes. `headers`: lowercase
        names, none connection-specific, no content-length or date (the
        carrier adds its own date, server unless `own_server`, and the
        operator's headers); `length`: the declared body length, None when
        unknown; `end`: nothing follows (a bodyless response passes b"")."""

    def send_body(self, data: bytes, end: bool) -> None:
        """More body bytes; `end`: the last of them."""

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The trailer fields, which end the response."""

    def send_continue(self) -> None:
        """100 Continue: the app is about to read a body the client holds back."""

    async def drain(self) -> None:
        """Return once the peer has taken enough that writing may go on."""

    def pause_reading(self) -> None:
        """The app has not taken the body buffered for it."""

    def resume_reading(self) -> None: ...

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is complete: account and log it, then serve the next
        one or close."""

    def close(self) -> None:
        """Abort: a half-written response can only be ended this way (the
        connection closes, HTTP/1.1; the stream is reset, HTTP/2)."""
