"""A listener whose connections start with a PROXY protocol header.

Used instead of `loop.create_server` when --proxy-protocol is not off, so a
server without it pays nothing. Each accepted connection is read with
MSG_PEEK and only the header's own bytes are taken off the socket: the
ClientHello (or the first HTTP request) stays in the kernel for the TLS layer
`loop.connect_accepted_socket` puts on top. Reading the header from a
protocol and then calling `loop.start_tls` loses whatever arrived with it:
uvloop's start_tls feeds its SSL protocol only from later reads, and the
client's ClientHello usually shares the header's segment (checked: the
handshake then times out).

A peer not in --proxy-allow-ips, a missing or malformed header, or one not
complete within the header timeout closes the connection before any byte
of ours is written.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any

from zion.http.accept_errors import AcceptErrors
from zion.http.connection_start import ConnectionStart
from zion.http.forwarded import TrustedProxies
from zion.log import get_logger
from zion.proxy import MAX_LENGTH, Command, ProxyHeader, ProxyProtocolError, parse

if TYPE_CHECKING:
    from zion.http.state import ServerState

log = get_logger("zion.http")

# A balancer writes the header with its first segment; a peer that has not
# sent one this long after connecting (or within limits.handshake_timeout, if
# shorter) is not a balancer.
HEADER_TIMEOUT = 5.0
_ACCEPT_BATCH = 64  # accepts per readable event, so one busy listener cannot starve the loop
_ACCEPT_RETRY = 0.1  # seconds to stop accepting after EMFILE and the like
_NOT_LISTENING_RETRY = 0.001  # seconds, after accept(2) says EINVAL
# accept(2), Linux: errors of the connection being accepted, already pending
# on it, "should be treated like EAGAIN by retrying"; and ECONNABORTED.
_RETRY_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENOPROTOOPT, errno.ENETDOWN,
                           errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                           errno.ENETUNREACH, errno.EPERM})


class ProxyListener:
    def __init__(self, state: ServerState, sock: socket.socket, ssl_ctx: ssl.SSLContext | None,
                 *, v1: bool, v2: bool, allow: str, handshake_timeout: float,
                 shutdown_timeout: float) -> None:
        self.state = state
        self.loop = state.loop
        self.sock = sock
        self.ssl_ctx = ssl_ctx
        self.v1, self.v2 = v1, v2
        self.allow = TrustedProxies(allow)
        self.trust_forwarded = state.settings.server.proxy_protocol_trust_forwarded
        self.accept_errors = AcceptErrors()
        self.handshake_timeout = handshake_timeout
        self.header_timeout = min(HEADER_TIMEOUT, handshake_timeout)
        self.shutdown_timeout = shutdown_timeout
        self.reading: set[_HeaderReader] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.accepting = False
        self.closed = False

    @property
    def pending(self) -> int:
        """Connections accepted but not yet handed to HTTP."""
        return len(self.reading) + len(self.handshakes)

    def start(self) -> None:
        self.sock.setblocking(False)
        self._resume()

    def close(self) -> None:
        """Stop accepting; connections already accepted go on to be served."""
        self.closed = True
        self._pause()

    def _pause(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def _resume(self) -> None:
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    # Not listening: for microseconds while the master moves
                    # this listener's queue (zion/demux/requeue.py), or for
                    # good once a shrink retired it. A shut listener stays
                    # readable (EPOLLHUP): look again shortly, do not spin.
                    self._pause()
                    self.loop.call_later(_NOT_LISTENING_RETRY, self._resume)
                    return
                if exc.errno in _RETRY_ERRNOS:
                    continue
                self.accept_errors.failed(exc.errno or 0)
                # Stop for a moment rather than spin on a listener that is
                # readable and cannot be accepted from.
                self._pause()
                self.loop.call_later(_ACCEPT_RETRY, self._resume)
                return
            if not self.allow.trusts(addr[0]):
                self.state.listener_accepted()
                _reject(conn, addr, "peer not in proxy_allow_ips")
                continue
            if self.pending >= self.state.limits.max_connections:
                self.state.listener_accepted()
                _reject(conn, addr, "too many connections waiting for their PROXY header")
                continue
            # Load for the demux from now on, as a TLS handshake is on
            # create_server's path: its header, then its handshake, until
            # the protocol's connection_made (or its failure) ends it.
            self.state.connection_accepted()
            reader = _HeaderReader(self, conn, addr)
            self.reading.add(reader)
            reader.start()

    def header_read(self, reader: _HeaderReader, header: ProxyHeader) -> None:
        self.reading.discard(reader)
        origin = header.source if header.command is Command.PROXY else None
        task = self.loop.create_task(self._serve(reader.sock, origin))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _serve(self, sock: socket.socket, origin: tuple[str, int] | None) -> None:
        state = self.state
        made = False

        def protocol() -> ConnectionStart:
            nonlocal made
            made = True  # from here the protocol ends the handshake's load
            # Its X-Forwarded-*/Forwarded headers are not believed unless the
            # operator asked (server.proxy_protocol_trust_forwarded): a balancer
            # that writes a PROXY header passes the bytes after it through
            # untouched (TCP mode), so those came from the client. A LOCAL
            # header (the balancer's own check) names no client: the peer is
            # judged as any other, by forwarded_allow_ips.
            return ConnectionStart(state, counted=True, origin=origin,
                                   trust_forwarded=self.trust_forwarded)

        try:
            if self.ssl_ctx is None:
                await self.loop.connect_accepted_socket(protocol, sock)
            else:
                await self.loop.connect_accepted_socket(
                    protocol, sock, ssl=self.ssl_ctx,
                    ssl_handshake_timeout=self.handshake_timeout,
                    ssl_shutdown_timeout=self.shutdown_timeout)
        except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
            # A failed handshake, as create_server's path drops it.
            log.debug("handshake_failed", error=str(exc) or type(exc).__name__,
                      client=origin and origin[0])
            if not made:
                state.handshake_ended()
            sock.close()


class _HeaderReader:
    """Reads one connection's PROXY header, never a byte past it."""

    __slots__ = ("owner", "sock", "peer", "got", "timer", "watching")

    def __init__(self, owner: ProxyListener, sock: socket.socket, peer: Any) -> None:
        self.owner = owner
        self.sock = sock
        self.peer = peer
        self.got = b""
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False
        sock.setblocking(False)

    def start(self) -> None:
        # A balancer's header is usually in by the time we accept: try it
        # at once, and only wait (a reader and a timer) when it is not.
        self._readable()
        if self in self.owner.reading:  # neither served nor refused yet
            owner = self.owner
            self.watching = True
            owner.loop.add_reader(self.sock.fileno(), self._readable)
            self.timer = owner.loop.call_later(
                owner.header_timeout, self._fail,
                f"no complete PROXY header within {owner.header_timeout:g} s")

    def _readable(self) -> None:
        sock = self.sock
        try:
            peek = sock.recv(MAX_LENGTH - len(self.got), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return
        if not peek:
            # Connected and closed without a byte: a TCP health check (AWS
            # NLB's, HAProxy's plain `check`) or a port probe, every few
            # seconds: not worth an info line each.
            self._fail("closed before its PROXY header was complete", quiet=not self.got)
            return
        try:
            header = parse(self.got + peek, v1=self.owner.v1, v2=self.owner.v2)
        except ProxyProtocolError as exc:
            self._fail(str(exc))
            return
        # Every byte peeked is the header's while it is incomplete; once it is
        # complete, exactly its remainder is taken, the rest is TLS's.
        want = len(peek) if header is None else header.length - len(self.got)
        try:
            taken = sock.recv(want)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return
        self.got += taken
        if header is not None and len(taken) == want:
            self._done()
            self.owner.header_read(self, header)

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watching:
            self.watching = False
            self.owner.loop.remove_reader(self.sock.fileno())

    def _fail(self, reason: str, quiet: bool = False) -> None:
        self._done()
        self.owner.reading.discard(self)
        self.owner.state.handshake_ended()
        _reject(self.sock, self.peer, reason, quiet)


def _reject(sock: socket.socket, peer: Any, reason: str, quiet: bool = False) -> None:
    (log.debug if quiet else log.info)("proxy_header_rejected", peer=peer[0] if peer else None,
                                       reason=reason)
    sock.close()
