"""A worker process: uvloop, one listener, the HTTP protocol, the app.

Entered in the child right after fork, with the frozen Settings and the
SSLContext the master built (so the session-ticket keys are shared). It never
returns: the caller turns the result into an exit code with os._exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvloop

from zion import log, privileges
from zion.asgi import Lifespan, load_app
from zion.counters import CounterBoard
from zion.demux.board import IDLE_BEATS, StatusBoard
from zion.errors import ExitCode, WorkerBootError
from zion.handlers import default_page
from zion.handlers.builtins import PREFIX, Builtins
from zion.handlers.static import StaticFiles
from zion.http import accept_errors, access_log, admission
from zion.http.asgi_types import HTTPScope
from zion.http.connection_start import ConnectionStart
from zion.http.exchange import Exchange
from zion.http.proxy_listener import ProxyListener
from zion.http.state import ASGIApp, Dispatch, ServerState, WebSocketFactory
from zion.http.websocket import WebSocketProtocol, request_bytes
from zion.quic.sockets import WorkerQuic
from zion.settings import ProxyProtocol, Settings
from zion.watchdog import LoopWatchdog

_TICK = 0.5  # seconds between Date refreshes and timeout sweeps
_DRAIN_QUIET = 0.1  # seconds without connections before a draining worker exits
_TASK_GRACE = 1.0  # seconds app tasks get after their connection closed
_TLS_SHUTDOWN_TIMEOUT = 2.0  # seconds a closed TLS connection waits for close_notify

logger = log.get_logger("zion.worker")


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    generation: int
    sock: socket.socket
    ready_fd: int
    close_fds: tuple[int, ...]  # master-only descriptors inherited through fork


def main(spec: WorkerSpec, settings: Settings, ssl_ctx: ssl.SSLContext | None,
         board: StatusBoard, demux_info: dict[str, Any], counters: CounterBoard,
         uds: socket.socket | None = None, quic: WorkerQuic | None = None) -> int:
    # The master's signal handlers are undone by the fork (supervisor/pool.py).
    master_pid = os.getppid()
    log.configure(settings.log.format, settings.log.level, worker=spec.index,
                  log_config=settings.log.config)
    access_log.configure(settings.log.access_log_format)
    for fd in spec.close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    quic_config = None
    if quic is not None:
        # Before the privileges go: the key file may be readable by root only.
        from zion.quic.tls import configuration
        try:
            quic_config = configuration(settings)
        except WorkerBootError as exc:
            logger.error("worker_boot_failed", error=str(exc))
            return ExitCode.WORKER_BOOT
    # The socket is bound and the TLS context built: a worker needs no privilege.
    identity = privileges.resolve(settings.server.user, settings.server.group)
    try:
        privileges.drop_worker_privileges(identity, master_pid)
    except OSError as exc:
        logger.error("privilege_drop_failed", error=str(exc))
        return ExitCode.WORKER_BOOT
    if identity is None and os.getuid() == 0 and spec.index == 0 and spec.generation == 0:
        # Once per server, from the first worker once it is up.
        logger.warning("workers_run_as_root", hint="workers hold no capability, but "
                       "--user USER (or [server] user) also takes uid 0 from them")
    if demux_info.get("mode") == "cpu" and demux_info.get("state") == "attached":
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[spec.index % len(cpus)]})
    loop = WorkerLoop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(spec, settings, ssl_ctx, board, demux_info,
                                              counters, uds, quic, quic_config))
    except WorkerBootError as exc:
        logger.error("worker_boot_failed", error=str(exc))
        return ExitCode.WORKER_BOOT
    finally:
        loop.close()


async def _serve(spec: WorkerSpec, settings: Settings, ssl_ctx: ssl.SSLContext | None,
                 board: StatusBoard, demux_info: dict[str, Any], counters: CounterBoard,
                 uds: socket.socket | None, quic: WorkerQuic | None = None,
                 quic_config: Any = None) -> int:
    loop = asyncio.get_running_loop()
    slot = board.slots[spec.index]
    server_settings = settings.server
    app = (load_app(server_settings.app, server_settings.factory, server_settings.app_dir)
           if server_settings.app else None)
    started = time.time()

    def status() -> dict[str, Any]:
        return {
            "worker": spec.index,
            "pid": os.getpid(),
            "generation": spec.generation,
            "uptime_s": round(time.time() - started, 1),
            "connections": len(state.connections),
            "max_connections": settings.limits.max_connections,
            "overloaded": overloaded(),
            "shedding": admission.at_limit(settings.limits.concurrency,
                                           len(state.connections), inflight.count()),
            "requests_total": state.requests_total,
            # Request body its HTTP/2 and HTTP/3 apps have not read, against
            # the budget past which connections holding some wait for window.
            "unread_body_bytes": state.unread_body,
            "unread_body_per_worker": settings.limits.unread_body_per_worker,
            "demux": {**demux_info,
                      # connections the program left to the kernel's hash
                      "fallbacks": board.fallbacks,
                      "workers": board.snapshot(settings.demux.stall_threshold_ms)},
        }

    state = ServerState(settings, spec.index, loop, slot,
                        counters.for_worker(spec.index, spec.generation))
    if isinstance(loop, WorkerLoop):
        loop.attach(state)
    inflight = admission.InFlight()  # what --limit-concurrency counts

    def overloaded() -> bool:
        return len(state.connections) >= settings.limits.max_connections

    # SIGUSR1 from the master: the host is leaving (--shutdown-delay), so
    # /_zion/ready fails while everything else is still served.
    leaving = False
    recycling = False  # SIGUSR2: being replaced (--limit-worker-memory)

    def ready() -> bool:
        # Not while leaving, draining, or shedding (--limit-concurrency).
        return not (leaving or state.draining or admission.at_limit(
            settings.limits.concurrency, len(state.connections), inflight.count()))

    static = StaticFiles(server_settings.root, state.tasks) if server_settings.root else None
    state.dispatch = handler_chain(state, inflight, app, static,
                                   Builtins(status, overloaded, ready,
                                            # Every connection came through a balancer.
                                            behind_proxy_protocol=server_settings.proxy_protocol
                                            is not ProxyProtocol.OFF)
                                   if server_settings.builtins
                                   else None)
    if app is not None:
        state.websocket_factory = websocket_factory(state, app)
    lifespan = None
    lifespan_mode = server_settings.lifespan
    if app is not None and lifespan_mode != "off":
        lifespan = Lifespan(app, state.lifespan_state)
        await lifespan.startup(settings.supervisor.boot_timeout,
                               required=lifespan_mode == "on")
    _freeze_startup_objects()
    server = await _listen(state, spec.sock, ssl_ctx)
    uds_server = await _listen_unix(state, uds, ssl_ctx) if uds is not None else None
    quic_endpoint = (await _listen_quic(state, spec.index, quic, quic_config)
                     if quic is not None else None)
    stop = asyncio.Event()

    def stop_accepting() -> None:
        server.close()
        if uds_server is not None:
            uds_server.close()
        if quic_endpoint is not None:
            quic_endpoint.accepting = False  # its sessions end with the connections

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master reloads, not us

    def leave() -> None:
        nonlocal leaving
        leaving = True

    loop.add_signal_handler(signal.SIGUSR1, leave)

    def recycle_soon() -> None:
        # SIGUSR2 from the master: past --limit-worker-memory, a replacement
        # is starting on this listener. Take no new connection: the kernel
        # queues them on the listener (the master holds it) for the
        # replacement, and the program steers new ones to the other workers.
        # A worker past its limit that kept accepting until its replacement
        # was ready grew on with every new client (4 MiB a request in
        # tests/supervisor/test_limits.py: past the hard ceiling, and killed,
        # while a loaded machine booted the replacement). Keep no connection
        # alive either: each response says `connection: close` (HTTP/2:
        # GOAWAY once a stream ends), so the client's next request reconnects.
        nonlocal recycling
        if recycling:
            return
        recycling = True
        logger.info("worker_draining_for_replacement", connections=len(state.connections))
        state.draining = True
        stop_accepting()
        for conn in list(state.connections):
            conn.shutdown()

    loop.add_signal_handler(signal.SIGUSR2, recycle_soon)
    beat = _Heartbeat(loop, state, settings.demux.heartbeat_interval_ms / 1000)
    watchdog = None
    if settings.supervisor.stuck_timeout:
        watchdog = LoopWatchdog(slot, settings.demux.stall_threshold_ms / 1000, main.__code__)
        watchdog.start()
    limits = settings.limits
    # --limit-max-requests: retire after this many (0 = never), jittered per worker.
    budget = (limits.max_requests + random.randint(0, limits.max_requests_jitter)
              if limits.max_requests else 0)
    recycled = False

    def retire_when_spent() -> None:
        nonlocal recycled
        if budget and state.requests_total >= budget and not stop.is_set():
            recycled = True
            logger.info("worker_retiring", requests_total=state.requests_total, limit=budget)
            stop.set()

    ticker = _Ticker(loop, state, retire_when_spent)
    # libuv closes new connections silently while out of descriptors: say so.
    fd_probe = accept_errors.DescriptorProbe(loop)
    fd_probe.start()
    slot.pid = os.getpid()
    os.write(spec.ready_fd, b"R")
    os.close(spec.ready_fd)
    logger.debug("worker_serving", generation=spec.generation)
    await stop.wait()
    # Drain: no new connections from this worker; the master keeps the socket,
    # so what the kernel queues on it waits for the next worker.
    if watchdog is not None:
        watchdog.stop()
    beat.stop()
    fd_probe.stop()
    stop_accepting()
    state.draining = True
    logger.debug("worker_draining", connections=len(state.connections),
                 not_yet_http=_accepted_not_served(server))
    for conn in list(state.connections):
        conn.shutdown()
    deadline = loop.time() + settings.supervisor.drain_timeout
    quiet_since = None
    # Connections still in their TLS handshake are invisible until it ends, so
    # the worker is drained only once it has had no connection for a moment.
    # App tasks that outlive their response (background tasks) count too.
    while loop.time() < deadline:
        if state.connections or state.tasks or _accepted_not_served(server):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= _DRAIN_QUIET:
            break
        await asyncio.sleep(0.02)
    left = len(state.connections)
    for conn in list(state.connections):
        conn.close()
    # close() over TLS sends close_notify and waits (up to _TLS_SHUTDOWN_TIMEOUT,
    # then uvloop aborts) for the peer's before the socket closes and the
    # connection leaves state.connections; a loop closed before then leaves the
    # socket open (an unclosed TCPTransport, a ResourceWarning) and the peer's
    # close unanswered. Seen with a WebSocket closed with 1001 at the drain's end.
    closing_deadline = loop.time() + _TLS_SHUTDOWN_TIMEOUT + 0.5
    while state.connections and loop.time() < closing_deadline:
        await asyncio.sleep(0.02)
    await _finish_tasks(state.tasks)
    if quic_endpoint is not None:
        quic_endpoint.close()
    ticker.stop()
    if lifespan is not None:
        await lifespan.shutdown(settings.supervisor.drain_timeout)
    logger.info("worker_stopped", requests_total=state.requests_total, forced_closed=left)
    return ExitCode.RECYCLED if recycled else ExitCode.OK


def _keepalive(sock: socket.socket, idle: int) -> None:
    """TCP keepalive on the listener, which every connection accepted from it
    inherits (Linux copies the socket, options and all, at accept): no system
    call per connection. Without it a peer that vanished without a FIN holds
    its connection for ever when zion has nothing to send it (a WebSocket
    whose app neither sends nor receives)."""
    if not idle:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 4))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


async def _listen(state: ServerState, sock: socket.socket, ssl_ctx: ssl.SSLContext | None
                  ) -> asyncio.Server | ProxyListener:
    settings = state.settings
    limits = settings.limits
    _keepalive(sock, settings.server.tcp_keepalive)
    mode = settings.server.proxy_protocol
    if mode is not ProxyProtocol.OFF:
        listener = ProxyListener(
            state, sock, ssl_ctx, v1=mode in (ProxyProtocol.V1, ProxyProtocol.AUTO),
            v2=mode in (ProxyProtocol.V2, ProxyProtocol.AUTO),
            allow=settings.server.proxy_allow_ips, handshake_timeout=limits.handshake_timeout,
            shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT)
        listener.start()
        return listener
    loop = state.loop
    if ssl_ctx is None:
        return await loop.create_server(lambda: ConnectionStart(state, accepted=True), sock=sock,
                                        backlog=settings.server.backlog)
    return await loop.create_server(
        lambda: ConnectionStart(state, accepted=True), sock=sock, ssl=ssl_ctx,
        ssl_handshake_timeout=limits.handshake_timeout,
        # uvloop waits 30 s by default for the peer's close_notify after we
        # close; a closed connection should not linger that long.
        ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
        backlog=settings.server.backlog,
    )


async def _listen_quic(state: ServerState, index: int, quic: WorkerQuic, config: Any) -> Any:
    """HTTP/3 on this worker's UDP socket of the group, its server CIDs
    naming this worker's slot so the kernel program steers them here; and
    `Alt-Svc` on every HTTP/1.1 and HTTP/2 answer, so browsers switch."""
    from zion.http.h3 import H3Session
    from zion.quic import cid
    from zion.quic.endpoint import Link, QuicEndpoint

    # aioquic logs every connection's version and ALPN at INFO.
    logging.getLogger("quic").setLevel(logging.WARNING)
    host, port = quic.sock.getsockname()[:2]
    server = (host, port)

    def accept(link: Link) -> H3Session:
        return H3Session(state, link, server)

    limits = state.limits
    endpoint = QuicEndpoint(state.loop, config, cid.factory(index, quic.generation),
                            quic.reset_key, accept,
                            max_streams=limits.h3_max_streams,
                            retry_above=limits.h3_retry_above)
    await state.loop.create_datagram_endpoint(lambda: endpoint, sock=quic.sock)
    # RFC 7838: the same host offers HTTP/3 on this UDP port; browsers try it
    # for later requests (ma: how long they may remember it, one day).
    # HTTP/3 answers carry it too: it is part of every default header set.
    state.date.add(b"alt-svc", b'h3=":%d"; ma=86400' % port)
    return endpoint


async def _listen_unix(state: ServerState, sock: socket.socket, ssl_ctx: ssl.SSLContext | None
                       ) -> asyncio.Server:
    """--uds: every worker accepts from the one socket. Not `accepted=True`:
    the demux never dispatched these, so they are not taken off its count."""
    limits = state.settings.limits
    tls: dict[str, Any] = {} if ssl_ctx is None else {
        "ssl": ssl_ctx, "ssl_handshake_timeout": limits.handshake_timeout,
        "ssl_shutdown_timeout": _TLS_SHUTDOWN_TIMEOUT}
    return await state.loop.create_unix_server(lambda: ConnectionStart(state), sock=sock,
                                               backlog=state.settings.server.backlog, **tls)


def _accepted_not_served(server: asyncio.Server | ProxyListener) -> int:
    """Connections still reading their PROXY header or in their handshake."""
    return server.pending if isinstance(server, ProxyListener) else 0


class WorkerLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop's loop, keeping its ServerState's plain_tasks true while no
    task factory is set: a request's Task is then made without asking the
    loop each time (exchange.py). An app that sets a factory (at import, in
    its lifespan startup, or later) has it make every request's Task from
    the next one on, as loop.create_task would."""

    serving: ServerState | None = None

    def attach(self, state: ServerState) -> None:
        self.serving = state
        state.plain_tasks = self.get_task_factory() is None

    def set_task_factory(self, factory: Any) -> None:
        super().set_task_factory(factory)  # refuses what is not callable first
        if self.serving is not None:
            self.serving.plain_tasks = factory is None


def _freeze_startup_objects() -> None:
    """Move what import and startup made (the app, its framework, zion) out of
    the cyclic collector's reach: it lives as long as the worker, and a full
    collection would walk all of it again, writing to every object it visits.
    No gc.collect() first: that walk is exactly what unshares the pages the
    worker inherited from the master (measured: +21 MiB PSS over a 2-worker
    tree, 78 against 57 MiB). Python's gc.freeze() documentation."""
    gc.freeze()


def handler_chain(state: ServerState, inflight: admission.InFlight, app: ASGIApp | None,
                  static: StaticFiles | None, builtins: Builtins | None) -> Dispatch:
    """Who answers a request, in order: zion's /_zion/ endpoints, files that
    exist under --root, the app, the default page. Past --limit-concurrency
    the files and the app are shed (503 + Retry-After); /_zion/ always
    answers, so a probe sees the overload instead of waiting in it."""
    tasks = state.tasks
    limits = state.limits
    connections = state.connections
    timeout = limits.request_timeout

    def dispatch(ex: Exchange) -> None:
        if builtins is not None and ex.scope["path"].startswith(PREFIX):
            builtins.respond(ex)
        elif limits.concurrency and not admission.admit(ex, limits, len(connections),
                                                         inflight):
            return
        elif static is not None and static.wants(ex, has_app=app is not None):
            if limits.concurrency:
                inflight.enter(ex)  # left once its response is complete
            static.serve(ex)
        elif app is not None:
            answer = admission.with_deadline(app, ex, timeout) if timeout else app
            if limits.concurrency:
                inflight.enter(ex)
                answer = inflight.counted(answer, ex)
            ex.run(answer, tasks)
        else:
            default_page.respond(ex, state.worker_index)

    return dispatch


def websocket_factory(state: ServerState, app: ASGIApp) -> WebSocketFactory:
    def build(scope: HTTPScope, target: bytes, headers: list[tuple[bytes, bytes]],
              trailing: bytes | None) -> asyncio.Protocol:
        # None: an HTTP/2 extended CONNECT (RFC 8441), no HTTP/1.1 request to replay.
        raw = None if trailing is None else request_bytes(target, headers) + trailing
        return WebSocketProtocol(state, app, scope, raw)

    return build


async def _finish_tasks(tasks: set[asyncio.Task[Any]]) -> None:
    """App tasks still running once their connections are closed get a moment
    to see the disconnect, then are cancelled: none outlives the worker."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=_TASK_GRACE)
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(set(tasks), timeout=_TASK_GRACE)


class _Heartbeat:
    """Publishes CLOCK_MONOTONIC ns to the slot (a plain store, no syscall):
    every `interval` while the worker has work in hand (requests in flight,
    TLS handshakes), every IDLE_BEATS intervals while it has none, idle
    keep-alive connections included. The program takes an old heartbeat for
    a blocked loop only in a worker with work (zion_load in
    bpf/zion_demux.c), so a worker without any can sleep longer; work
    arriving at the idle pace (`state.heartbeat_slow`) brings the fast pace
    back at once (`wake`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: ServerState,
                 interval: float) -> None:
        self.loop, self.state, self.interval = loop, state, interval
        self.slot: Any = state.slot  # the board's Slot: heartbeat_ns too
        self.handle: asyncio.TimerHandle | None = None
        self.stopped = False
        state.became_busy = self.wake
        self._beat()

    def _beat(self) -> None:
        slot = self.slot
        slot.heartbeat_ns = time.monotonic_ns()
        fast = bool(slot.inflight or slot.handshakes)
        self.state.heartbeat_slow = not fast
        self.handle = self.loop.call_later(
            self.interval if fast else self.interval * IDLE_BEATS, self._beat)

    def wake(self) -> None:
        """Work arrived at the idle pace: beat now, and at the busy pace."""
        if self.stopped:
            return
        if self.handle is not None:
            self.handle.cancel()
        self._beat()

    def stop(self) -> None:
        self.stopped = True
        self.state.heartbeat_slow = False
        if self.handle is not None:
            self.handle.cancel()


class _Ticker:
    def __init__(self, loop: asyncio.AbstractEventLoop, state: ServerState,
                 also: Callable[[], None]) -> None:
        self.loop, self.state, self.also = loop, state, also
        self.handle: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        self.state.tick()
        self.also()
        self.handle = self.loop.call_later(_TICK, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
