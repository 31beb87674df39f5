"""What every connection of one worker shares: limits, the handler chain,
counters, and the set of open connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from zion.counters import WorkerCounters
from zion.http.asgi_types import ASGIApp as ASGIApp  # re-exported: http/ imports it here
from zion.http.asgi_types import HTTPScope
from zion.http.forwarded import TrustedProxies
from zion.http.response import DateCache

if TYPE_CHECKING:
    from zion.http.exchange import Exchange
    from zion.settings import Settings

# Answers one exchange: zion's built-ins, static files, the app - composed by
# the worker, so http/ knows none of them.
Dispatch = Callable[["Exchange"], None]
# Builds the protocol an upgraded connection switches to:
# (scope, request target, request headers, bytes after the request) -> protocol;
# None instead of bytes: an HTTP/2 extended CONNECT (RFC 8441), no HTTP/1.1 handshake.
WebSocketFactory = Callable[[HTTPScope, bytes, list[tuple[bytes, bytes]], bytes | None],
                            asyncio.Protocol]


class LoadSlot(Protocol):
    """This worker's entry in the status board the demux reads: http/ only
    keeps its load counters current."""

    conns: int
    inflight: int
    handshakes: int
    accepted: int


class RequestCounters(Protocol):
    """This worker's counters in shared memory (zion/counters.py), read by
    the master's /metrics: http/ only increments them."""

    requests: int
    responses_4xx: int
    responses_5xx: int
    tls_handshakes: int
    tls_resumed: int
    connections: int
    sendfile_bytes: int


class OpenConnection(Protocol):
    def check_deadline(self, now: float) -> None: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...


class ServerState:
    def __init__(self, settings: Settings, worker_index: int,
                 loop: asyncio.AbstractEventLoop, slot: LoadSlot,
                 counters: RequestCounters | None = None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.worker_index = worker_index
        self.loop = loop
        self.slot = slot
        # Private ones when nobody reads them (tests that build a state alone).
        self.counters: RequestCounters = counters if counters is not None else WorkerCounters()
        server = settings.server
        self.date = DateCache(server.server_header, server.date_header,
                              parse_headers(server.headers))
        self.connections: set[OpenConnection] = set()
        # Accepted, TLS handshake not finished: load the demux must see (a
        # worker that took a connection is busy with it before the app is).
        self.handshaking = 0
        # Handed to every ASGI scope as scope["state"] (filled by lifespan).
        self.lifespan_state: dict[str, Any] = {}
        self.draining = False
        self.requests_total = 0
        # Requests whose app task is running, kept here and stored into
        # slot.inflight (the status board the demux reads) on each change: a
        # ctypes field costs a few hundred instructions to read, and this
        # worker is the only writer of its slot's count while it runs.
        self.inflight = 0
        self.access_log = settings.log.access_log
        tls = settings.tls.enabled
        self.scheme = "https" if tls else "http"  # --no-tls: plain HTTP/1.1
        # --no-tls listeners speak HTTP/2 too when a client starts with its
        # connection preface (h2c "prior knowledge", RFC 9113 3.3), as behind
        # Envoy or Cloud Run; --no-http2 turns it off.
        self.h2c = not tls and settings.tls.http2
        # Client certificates were asked for: scopes carry the ASGI TLS extension.
        self.client_certs = tls and settings.tls.cert_reqs != "none"
        self.root_path = settings.server.root_path
        self.proxies = (TrustedProxies(settings.server.forwarded_allow_ips)
                        if settings.server.proxy_headers else None)
        # App tasks, kept referenced until done; cancelled when a drain ends.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.dispatch: Dispatch = _unset_dispatch
        self.websocket_factory: WebSocketFactory | None = None
        # Called when work arrives (a connection accepted, a request started)
        # while the heartbeat is at its idle pace (zion/worker.py keeps
        # heartbeat_slow): the busy pace starts at once. A request checks the
        # flag, not a call, on the per-request path.
        self.became_busy: Callable[[], None] = _nothing
        self.heartbeat_slow = False
        # The loop has no task factory, and says so when one is set (the
        # worker's loop, worker.WorkerLoop): a request's Task is then made
        # without asking the loop (exchange.py). False: loop.create_task.
        self.plain_tasks = False
        # Request body bytes this worker's HTTP/2 and HTTP/3 connections
        # hold that their apps have not read, each connection's total as of
        # its last count (h2.H2Protocol._credit, h3.H3Session.recount): past
        # limits.unread_body_per_worker they withhold their connection
        # windows for them.
        self.unread_body = 0

    def speaks_for_clients(self, client: tuple[str, int] | None) -> bool:
        """Whether this peer's forwarding headers are believed (once per connection)."""
        return self.proxies is not None and self.proxies.trusts(client and client[0])

    @property
    def websocket_enabled(self) -> bool:
        return self.websocket_factory is not None

    def tick(self) -> None:
        """Twice a second: refresh Date, time out idle or slow connections."""
        self.date.refresh()
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_deadline(now)

    def listener_accepted(self) -> None:
        """A connection was taken from the listener: the program's count of
        connections sent here and not accepted yet goes down by one."""
        self.slot.accepted += 1

    def connection_accepted(self) -> None:
        """Accepted, and its TLS handshake (or first read) starts: load from
        now on. conns before accepted: the program may read the slot between
        the two stores, and counting it twice for a moment is harmless, not
        at all is not."""
        handshaking = self.handshaking = self.handshaking + 1
        slot = self.slot
        slot.handshakes = handshaking
        slot.conns = len(self.connections) + handshaking
        slot.accepted += 1  # listener_accepted, without its call
        if self.heartbeat_slow:
            self.became_busy()

    def handshake_ended(self, opening: bool = False) -> None:
        """Its handshake finished, or failed (then nothing else follows).
        `opening`: the connection is opened next, in the same callback
        (connection_opened), which publishes both counts: each store into
        the board costs ~0.6k instructions, and the program no longer sees
        the connection missing from conns between the two."""
        if self.handshaking:
            self.handshaking -= 1
        if not opening:
            self.slot.handshakes = self.handshaking
            self.slot.conns = len(self.connections) + self.handshaking

    def connection_opened(self, conn: OpenConnection) -> None:
        self.connections.add(conn)
        self.counters.connections += 1
        slot = self.slot
        slot.handshakes = self.handshaking  # handshake_ended(opening=True) left it to us
        slot.conns = len(self.connections) + self.handshaking

    def connection_closed(self, conn: OpenConnection) -> None:
        self.connections.discard(conn)
        self.slot.conns = len(self.connections) + self.handshaking

    def connection_handed_over(self, conn: OpenConnection) -> None:
        """`conn` passed its transport to the protocol it picked, which opens
        it again: one connection, counted once."""
        self.connections.discard(conn)
        self.counters.connections -= 1


def _nothing() -> None:
    pass


def count_response(counters: RequestCounters, status: int) -> None:
    """One answered request, for /metrics: plain stores into shared memory."""
    counters.requests += 1
    if status >= 500:
        counters.responses_5xx += 1
    elif status >= 400:
        counters.responses_4xx += 1


def _unset_dispatch(ex: Exchange) -> None:
    ex.fail(503, "worker not ready")


def parse_headers(text: str) -> tuple[tuple[bytes, bytes], ...]:
    """--header values ("Name: value", one per line) as response header bytes;
    the settings already checked each has a name and no CR/LF in it."""
    out = []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        out.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
    return tuple(out)
