"""The UDP reuseport group HTTP/3 listens on: one unconnected SO_REUSEPORT
UDP socket per worker on the TCP port, held by the master for the life of
its generation like the TCP listeners.

A UDP reuseport group lets an SK_REUSEPORT program choose the socket for
every datagram, but only while no socket of the group is connected: one
connect(2) sets reuse->has_conns and the kernel scores sockets instead
(net/ipv4/udp.c, lookup_reuseport). So these sockets are never connected;
replies name their peer in sendto(2).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

from zion.errors import BindError

# Bytes of datagrams the kernel queues per socket before dropping: a worker
# whose loop is busy for a while must not lose a burst of Initials. The
# kernel caps it at net.core.rmem_max (SO_RCVBUF; root could force past it,
# the master does not).
RECEIVE_BUFFER = 4 << 20


@dataclass(frozen=True)
class WorkerQuic:
    """What a worker needs to serve HTTP/3: its socket of the group, the
    generation its server CIDs carry, and the key every worker derives
    stateless reset tokens with (zion/quic/connection.py)."""

    sock: socket.socket
    generation: int
    reset_key: bytes


@dataclass(frozen=True)
class UdpGroup:
    sockets: tuple[socket.socket, ...]
    host: str
    port: int
    family: socket.AddressFamily
    # One per server life: a worker that replaces another on a socket can
    # reset the connections the other left (RFC 9000 10.3).
    reset_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def for_worker(self, index: int, generation: int) -> WorkerQuic:
        return WorkerQuic(self.sockets[index], generation, self.reset_key)

    def close(self, keep: tuple[socket.socket, ...] = ()) -> None:
        """Close the sockets, but those in `keep` (carried into another
        generation's group)."""
        for sock in self.sockets:
            if sock not in keep:
                sock.close()


def bind_udp(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Every socket of the group sets SO_REUSEPORT before bind(2), under
        # the same effective uid (the kernel's condition for joining).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = (" (another process holds this UDP port without SO_REUSEPORT, or under "
                "another uid)") if exc.errno == errno.EADDRINUSE else ""
        raise BindError(f"cannot bind udp {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def bind_udp_group(host: str, port: int, family: socket.AddressFamily,
                   count: int) -> UdpGroup:
    """`count` UDP sockets on the TCP listeners' port (which must be known:
    the TCP group binds first)."""
    if not port:
        raise BindError("the UDP group binds the TCP group's port, which is not known yet")
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(bind_udp(host, port, family))
    except BindError:
        for sock in socks:
            sock.close()
        raise
    return UdpGroup(tuple(socks), host, port, family)
