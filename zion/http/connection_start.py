"""The first protocol of every accepted connection: it picks HTTP/1.1 or
HTTP/2 and hands the transport over before a byte of HTTP is read, so
neither protocol knows of the other.

- Over TLS, ALPN chose during the handshake (uvloop calls connection_made
  once it is done): "h2" is HTTP/2, anything else (or no ALPN) HTTP/1.1.
- Over plain TCP with HTTP/2 on (h2c prior knowledge, RFC 9113 3.4, as a
  TLS-terminating proxy speaks it): the client's first bytes decide; HTTP/2's
  connection preface is HTTP/2, anything else HTTP/1.1, fed those bytes.

It also keeps the connection counted as the demux's load from accept to the
end of the TLS handshake (a failed handshake drops this object without a
connection_made: __del__ says so), and for a PROXY-protocol connection puts
the client the header named on the protocol it picks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from zion.http.h1 import H1Protocol, H2cRequest
from zion.http.h2 import H2Protocol

if TYPE_CHECKING:
    from zion.http.state import ServerState

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4


class ConnectionStart(asyncio.Protocol):
    __slots__ = ("state", "handshaking", "origin", "trust_forwarded", "transport", "sniffed",
                 "deadline")

    def __init__(self, state: ServerState, accepted: bool = False, *,
                 counted: bool = False, origin: tuple[str, int] | None = None,
                 trust_forwarded: bool = False) -> None:
        """`accepted`: the listener just accepted it, count it as load from
        now on; `counted`: the listener counted it already (the PROXY
        listener); `origin`: the client a PROXY header named."""
        self.state = state
        self.handshaking = accepted or counted
        if accepted:
            state.connection_accepted()
        self.origin = origin
        self.trust_forwarded = trust_forwarded
        self.transport: Any = None
        self.sniffed = b""  # h2c: the first bytes, while they may still be the preface
        self.deadline = 0.0

    def __del__(self) -> None:
        if self.handshaking:  # uvloop dropped us: the TLS handshake failed
            self.handshaking = False
            self.state.handshake_ended()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        if self.handshaking:
            self.handshaking = False
            # Every way on from here opens the connection (connection_opened).
            state.handshake_ended(opening=True)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            counters = state.counters
            counters.tls_handshakes += 1
            if ssl_object.session_reused:
                counters.tls_resumed += 1
            h2 = ssl_object.selected_alpn_protocol() == "h2"
            self._hand_over(transport, H2Protocol(state) if h2 else H1Protocol(state), b"")
        elif not state.h2c:
            self._hand_over(transport, H1Protocol(state), b"")
        else:
            # Wait for the first bytes, counted and timed out as any
            # connection that has not spoken yet.
            self.transport = transport
            state.connection_opened(self)
            self.deadline = state.loop.time() + state.limits.header_timeout

    def data_received(self, data: bytes) -> None:
        data = self.sniffed + data
        if _H2_PREFACE.startswith(data[:len(_H2_PREFACE)]):
            if len(data) < len(_H2_PREFACE):
                self.sniffed = data  # the preface is split over reads
                return
            proto: H1Protocol | H2Protocol = H2Protocol(self.state)
        else:
            proto = H1Protocol(self.state, upgrade_to_h2)
        transport, self.transport = self.transport, None
        self.state.connection_handed_over(self)
        self._hand_over(transport, proto, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport = None
            self.state.connection_closed(self)

    def _hand_over(self, transport: Any, proto: H1Protocol | H2Protocol, data: bytes) -> None:
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.origin is not None:
            # Nothing has been read yet: every scope sees the original client.
            # Its forwarded headers are believed only if the operator said so
            # (the balancer passes the client's bytes through untouched).
            proto.client = self.origin
            proto.proxied = proto.proxied and self.trust_forwarded
        if data:
            proto.data_received(data)

    # -- as an open connection (state.OpenConnection), while it has not spoken --

    def check_deadline(self, now: float) -> None:
        if self.transport is not None and now >= self.deadline:
            self.close()

    def shutdown(self) -> None:
        """Drain: its first request is on the way; the deadline still holds."""

    def close(self) -> None:
        if self.transport is not None:
            transport, self.transport = self.transport, None
            self.state.connection_closed(self)
            transport.close()


def upgrade_to_h2(state: ServerState, request: H2cRequest, transport: Any, trailing: bytes,
                  client: tuple[str, int] | None, proxied: bool) -> None:
    """An `Upgrade: h2c` request was answered 101 (h1.py): HTTP/2 takes the
    transport, the request is its stream 1; `client`, `proxied` as HTTP/1.1
    had them (a PROXY header's client among them)."""
    proto = H2Protocol(state, request)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    proto.client, proto.proxied = client, proxied
    if trailing:
        proto.data_received(trailing)
