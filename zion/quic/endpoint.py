"""A worker's QUIC endpoint: its UDP socket, the connections on it, their timers.

Every datagram is routed by its destination connection ID to the connection
that issued it. The kernel program (bpf/zion_quic.c) already sent it to this
worker's socket by the slot in that CID, so a CID this worker does not know
is a connection it never had (or lost: its previous worker on this socket
died or was replaced): a short-header packet for one of zion's CIDs is
answered with a stateless reset, whose token every worker derives from the
CID (RFC 9000 10.3), so the client stops at once instead of after its idle
timeout. A new connection starts only from an Initial of at least 1,200
octets (RFC 9000 14.1: anything smaller cannot be a client's first flight).

The socket stays unconnected: one connect(2) would take the whole reuseport
group out of the program's hands (zion/quic/sockets.py). Replies name their
peer in sendto(2).

The HTTP layer gets each connection's QUIC events through the `Session` it
returns from `accept`; it asks for a transmission (`Link.transmit_soon`)
after it queued data, and the endpoint coalesces those into one flush per
loop iteration.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, Protocol, cast

from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # a Cython module: no stub exports it
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from zion.log import get_logger
from zion.quic import cid
from zion.quic.connection import ServerConnection, reset_token

log = get_logger("zion.quic")

# RFC 9000 14.1: a client's Initial datagram is padded to at least this.
_MIN_INITIAL = 1200
# RFC 9000 10.3: a stateless reset looks like a short-header packet of at
# least 21 octets (5 unpredictable + the 16-octet token), and is smaller
# than the packet that triggered it, so two endpoints cannot loop on them.
_MIN_RESET = 21
_MAX_RESET = 43
Address = Any  # (host, port) or (host, port, flowinfo, scope_id)


class Session(Protocol):
    """What the HTTP layer keeps for one QUIC connection."""

    def quic_event(self, event: events.QuicEvent) -> None: ...

    def transmitted(self) -> None:
        """Datagrams were processed and sent: acknowledgements may have freed
        send buffers (writers waiting for them may go on)."""

    def ended(self) -> None:
        """The connection is gone (closed, drained, or timed out)."""


class Link:
    """One QUIC connection on the endpoint: feeds it, runs its timer, sends."""

    __slots__ = ("endpoint", "quic", "session", "timer", "timer_at", "flush_due", "ended",
                 "handshaking")

    def __init__(self, endpoint: QuicEndpoint, quic: ServerConnection) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.session: Session | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.flush_due = False
        self.ended = False
        self.handshaking = True
        endpoint.handshakes += 1

    def receive(self, data: bytes, addr: Address) -> None:
        self.quic.receive_datagram(data, addr, now=self.endpoint.loop.time())
        self._events()
        # Not at once: the datagrams read in this iteration, and the answers
        # the app tasks they started write before the callback runs, leave
        # in one pass (one ACK and one packet where each would have built its
        # own: aioquic's packet building is most of the cost per request).
        self.transmit_soon()

    def transmit_soon(self) -> None:
        """Send what the HTTP layer queued, once, at the end of this iteration."""
        if not self.flush_due and not self.ended:
            self.flush_due = True
            self.endpoint.loop.call_soon(self.transmit)

    def transmit(self) -> None:
        self.flush_due = False
        if self.ended:
            return
        endpoint = self.endpoint
        loop = endpoint.loop
        sendto = endpoint.sendto
        for data, addr in self.quic.datagrams_to_send(now=loop.time()):
            sendto(data, addr)
        at = self.quic.get_timer()
        if at != self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(at, self._on_timer) if at is not None else None
            self.timer_at = at
        if self.session is not None:
            self.session.transmitted()

    def _on_timer(self) -> None:
        at = self.timer_at
        self.timer = self.timer_at = None
        now = self.endpoint.loop.time()
        self.quic.handle_timer(now=max(now, at or now))
        self._events()
        self.transmit()

    def _events(self) -> None:
        endpoint = self.endpoint
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self._handshake_over()
            elif isinstance(event, events.ConnectionIdIssued):
                endpoint.links[event.connection_id] = self
            elif isinstance(event, events.ConnectionIdRetired):
                endpoint.links.pop(event.connection_id, None)
            if self.session is not None:
                self.session.quic_event(event)
            if isinstance(event, events.ConnectionTerminated):
                self._end()
                return

    def abandon(self) -> None:
        """Forget the connection now, sending nothing (a handshake that never
        finished: its peer may not even exist)."""
        self._end()

    def refuse(self) -> None:
        """Close a connection whose handshake is not over and forget it now
        (ServerConnection.refuse says what is sent, and why not more)."""
        if self.ended:
            return
        sendto = self.endpoint.sendto
        for data, addr in self.quic.refuse(now=self.endpoint.loop.time()):
            sendto(data, addr)
        self._end()

    def _handshake_over(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.endpoint.handshakes -= 1

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._handshake_over()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.endpoint.forget(self)
        if self.session is not None:
            self.session.ended()


class QuicEndpoint(asyncio.DatagramProtocol):
    """The DatagramProtocol on a worker's UDP socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, configuration: QuicConfiguration,
                 new_cid: Callable[[int], bytes], reset_key: bytes,
                 accept: Callable[[Link], Session], *, max_streams: int,
                 retry_above: int) -> None:
        self.loop = loop
        self.configuration = configuration
        self.cid_length = configuration.connection_id_length
        self.new_cid = new_cid
        self.reset_key = reset_key
        self.max_streams = max_streams
        self.accept = accept
        self.links: dict[bytes, Link] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.accepting = True  # False while draining: new Initials are ignored
        self.resets_sent = 0
        self.handshakes = 0  # connections whose handshake is not over
        # limits.h3_retry_above: past it a new client gets a Retry first.
        self.retry_above = retry_above
        # Its key is this worker's: a retried Initial comes back to this
        # worker, since the Retry's source CID names its slot.
        self.retry = QuicRetryTokenHandler()
        self.retries_sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not a subclass of asyncio's: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def sendto(self, data: bytes, addr: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def connections(self) -> set[Link]:
        return set(self.links.values())

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if data and not data[0] & 0x80:
            # A short header (RFC 9000 17.3: form bit clear), nearly every
            # datagram: its DCID is ours, so of our fixed length, right after
            # the first octet; no header parse to find the connection.
            link = self.links.get(data[1:1 + self.cid_length])
            if link is not None:
                link.receive(data, addr)
                return
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return  # not QUIC, or truncated: nothing to answer
        link = self.links.get(header.destination_cid)
        if link is not None:
            link.receive(data, addr)
            return
        if header.version is not None and header.packet_type != QuicPacketType.VERSION_NEGOTIATION \
                and header.version not in self.configuration.supported_versions:
            # RFC 9000 6.1; never in answer to a Version Negotiation packet
            # (two spoofed servers would answer each other for ever).
            if len(data) >= _MIN_INITIAL:
                self.sendto(encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=self.configuration.supported_versions), addr)
            return
        if header.packet_type == QuicPacketType.INITIAL:
            if len(data) >= _MIN_INITIAL and self.accepting:
                self._initial(header, data, addr)
            return
        if header.version is None:
            self._stateless_reset(header.destination_cid, len(data), addr)

    def _initial(self, header: Any, data: bytes, addr: Address) -> None:
        """A client's first Initial: a new connection, or a Retry first when
        this worker has too many handshakes in progress."""
        now = self.loop.time()
        if header.token:
            try:
                original = self.retry.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token,
                    now=now)
            except ValueError:
                pass  # not ours (or stale): as if it had none
            else:
                self._new_connection(header.destination_cid, data, addr, original,
                                     header.destination_cid)
                return
        if self.handshakes >= self.retry_above:
            # Its source CID is one of ours, so the retried Initial (sent to
            # it) is steered back to this worker by the program.
            source = self.new_cid(self.configuration.connection_id_length)
            self.retries_sent += 1
            self.sendto(encode_quic_retry(
                version=header.version, source_cid=source,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=self.retry.create_token(
                    address=addr, original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=source, now=now)), addr)
            return
        self._new_connection(header.destination_cid, data, addr, header.destination_cid, None)

    def _new_connection(self, dcid: bytes, data: bytes, addr: Address, original_dcid: bytes,
                        retry_scid: bytes | None) -> None:
        quic = ServerConnection(configuration=self.configuration, new_cid=self.new_cid,
                                reset_key=self.reset_key, max_streams=self.max_streams,
                                original_destination_connection_id=original_dcid,
                                retry_source_connection_id=retry_scid)
        link = Link(self, quic)
        # The client's Initials (a post-quantum ClientHello spans two) keep
        # the DCID they came with until our first answer reaches it.
        self.links[dcid] = link
        self.links[quic.host_cid] = link
        link.session = self.accept(link)
        link.receive(data, addr)

    def _stateless_reset(self, dcid: bytes, size: int, addr: Address) -> None:
        if cid.parse(dcid) is None or size <= _MIN_RESET:
            return  # not one of our CIDs, or too small to answer smaller
        length = min(size - 1, _MAX_RESET)
        noise = bytearray(os.urandom(length - 16))
        noise[0] = 0x40 | (noise[0] & 0x3F)  # a short header's fixed bit, form bit clear
        self.resets_sent += 1
        self.sendto(bytes(noise) + reset_token(self.reset_key, dcid), addr)

    def forget(self, link: Link) -> None:
        for key in [k for k, v in self.links.items() if v is link]:
            del self.links[key]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for an unconnected socket (a client gone away): the
        # connection's own loss detection and idle timeout deal with it.
        log.debug("quic_socket_error", error=str(exc))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
