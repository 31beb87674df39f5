"""One generation of workers and what it runs on: settings, TLS context,
listeners, demux and status board; and a reload's progress from one
generation to the next (begin -> on_ready ... -> commit, or abort).

A reload that keeps the worker count and demux settings reuses the
listeners and the program (the kernel keeps routing to the same sockets);
one that resizes gets a new group: slots that stay keep their socket and its
queue, extra slots get new sockets, and a new program is loaded against the
same sockarray, to be swapped in atomically once the new workers are ready.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from zion.demux import policy
from zion.demux.board import StatusBoard
from zion.demux.policy import DemuxOutcome
from zion.demux.reasons import DemuxState
from zion.demux.shim import ShimError, sockarray_set
from zion.errors import BindError, ZionError
from zion.listeners import ListenerGroup, accept_queue_len, bind_group, bind_one
from zion.log import get_logger
from zion.quic.policy import QuicGroup, bind_and_steer
from zion.settings import Settings, worker_count
from zion.tls import build_context

logger = get_logger("zion.master")

_TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@dataclass
class Generation:
    number: int
    settings: Settings
    ssl_ctx: ssl.SSLContext | None  # None with --no-tls
    group: ListenerGroup
    demux: DemuxOutcome
    board: StatusBoard
    # --http3: this generation's UDP sockets and the steering program they
    # share with the others (zion/quic/policy.py, QuicGroup.next_generation).
    quic: QuicGroup | None = None

    @property
    def count(self) -> int:
        return len(self.group.sockets)

    def master_fds(self) -> tuple[int, ...]:
        return self.demux.master_fds + (self.quic.master_fds if self.quic else ())


def first(settings: Settings) -> tuple[Generation, str]:
    """Generation 0: bind every listener, then attach the demux before any
    worker accepts, so the program decides from the very first connection."""
    ssl_ctx, cert_source = _context(settings)
    count = worker_count(settings)
    group = bind_group(settings.server.host, settings.server.port, count,
                       settings.server.backlog)
    demux = policy.setup(settings, group)
    quic = bind_and_steer(settings, group, demux) if settings.tls.http3 else None
    return Generation(0, settings, ssl_ctx, group, demux,
                      demux.board or StatusBoard.anonymous(count), quic), cert_source


def _context(settings: Settings) -> tuple[ssl.SSLContext | None, str]:
    """The generation's TLS context and where its certificate came from; with
    --no-tls none, and no certificate is read or made."""
    if not settings.tls.enabled:
        return None, "off"
    return build_context(settings.tls)


class Step(Enum):
    """What a reload's progress asks the master to do next."""

    WAIT = "wait"  # some new workers are not ready yet
    COMMIT = "commit"  # every new worker is ready: swap the generations
    ABORT = "abort"  # a new worker died first: keep the running generation


@dataclass
class Reload:
    """A reload in progress: the new generation and the slots not ready yet."""

    new: Generation
    pending: set[int] = field(default_factory=set)

    def on_ready(self, index: int) -> Step:
        self.pending.discard(index)
        return Step.WAIT if self.pending else Step.COMMIT

    def on_death(self, index: int) -> Step:
        # A new worker that dies (or misses its boot deadline) before the
        # commit means the new code or settings do not start: the old
        # generation keeps serving rather than trading working workers for
        # a crash loop.
        return Step.ABORT


def begin(current: Generation, settings: Settings) -> Reload:
    """Plan the next generation from freshly loaded settings. Raises ZionError
    when the change cannot be applied without a restart."""
    old = current.settings
    if (settings.server.host, settings.server.port) != (old.server.host, old.server.port):
        raise ZionError("changing host or port needs a restart")
    if settings.admin != old.admin:
        raise ZionError("changing [admin] listen or agent needs a restart")
    if settings.tls.http3 != old.tls.http3:
        raise ZionError("changing tls.http3 needs a restart")
    # A new context every reload: OpenSSL makes fresh session-ticket keys for
    # it, so a reload (and ticket_key_lifetime, which reloads) rotates them.
    # Within a generation every worker shares the context, so clients resume
    # whichever worker answers; across a rotation they do one full handshake.
    ssl_ctx, _ = _context(settings)
    count = worker_count(settings)
    number = current.number + 1
    if count == current.count and settings.demux == old.demux:
        new = Generation(number, settings, ssl_ctx, current.group, current.demux,
                         current.board)
    else:
        new = _regroup(current, settings, ssl_ctx, count, None)
    if current.quic is not None:
        # After the TCP side: a new count or demux means a new QUIC program
        # reading the new status board.
        new.quic = current.quic.next_generation(number, count, settings, new.demux,
                                                new.demux is current.demux)
    return Reload(new, set(range(count)))


def _regroup(current: Generation, settings: Settings, ssl_ctx: ssl.SSLContext | None,
             count: int, quic: QuicGroup | None) -> Generation:
    old = current.group
    socks = list(old.sockets[:count])
    try:
        while len(socks) < count:
            socks.append(bind_one(old.host, old.port, old.family, settings.server.backlog))
    except BindError:
        for sock in socks[len(old.sockets):]:
            sock.close()
        raise
    group = ListenerGroup(tuple(socks), old.host, old.port, old.family)
    demux = policy.setup(settings, group, attach=False, previous=current.demux)
    if (count < current.count and demux.state is not DemuxState.PREPARED
            and _TCP_MIGRATE_REQ.exists() and _TCP_MIGRATE_REQ.read_text().strip() == "0"):
        logger.warning(
            "reload_shrink_without_demux",
            hint="without the demux the kernel hash keeps queueing connections on the "
            "listeners being retired; sysctl -w net.ipv4.tcp_migrate_req=1 makes the kernel "
            "move them to the others when those listeners close")
    return Generation(current.number + 1, settings, ssl_ctx, group, demux,
                      demux.board or StatusBoard.anonymous(count), quic)


def stop_listening(sock: socket.socket) -> None:
    """Take a listener out of the group now, whoever else holds it: shutdown(2)
    on a listening socket runs inet_csk_listen_stop at once, and the kernel
    migrates its accept queue (and, when their ACK comes, its half-open
    connections) to the listener the SELECT_OR_MIGRATE program picks (or, with
    no such program, the hash if net.ipv4.tcp_migrate_req=1; else resets them)."""
    with contextlib.suppress(OSError):  # ENOTCONN: it was no longer listening
        sock.shutdown(socket.SHUT_RDWR)


def closing_migrates(gen: Generation) -> bool:
    """Whether a listener of this generation that stops listening hands its
    queue to the others instead of resetting it: the program was loaded as
    SELECT_OR_MIGRATE, or net.ipv4.tcp_migrate_req=1 (per network
    namespace; the kernel's hash then picks among the listeners left)."""
    if gen.demux.migrates:
        return True
    try:
        return _TCP_MIGRATE_REQ.read_text().strip() == "1"
    except OSError:
        return False


def hand_over_queue(gen: Generation, index: int) -> bool:
    """A worker died: give its slot a fresh listener and close the old one, so
    the kernel migrates what was queued on it to a live worker through the
    program instead of keeping it for the replacement (which may take a
    respawn backoff and an app import to start). Only when the program was
    loaded as SELECT_OR_MIGRATE; otherwise (False) the old listener stays and
    the replacement serves its queue. The slot must no longer be READY."""
    program = gen.demux.program
    if not gen.demux.migrates or program is None:
        return False
    group = gen.group
    try:
        fresh = bind_one(group.host, group.port, group.family, gen.settings.server.backlog)
    except BindError as exc:
        logger.warning("listener_replace_failed", index=index, error=str(exc))
        return False
    try:
        sockarray_set(program.sockarray_fd, index, fresh)
    except ShimError as exc:
        fresh.close()
        logger.warning("listener_replace_failed", index=index, error=str(exc))
        return False
    old = group.sockets[index]
    gen.group = group.with_socket(index, fresh)
    gen.board.forget_pending(index)
    queued = accept_queue_len(old)
    stop_listening(old)
    old.close()
    logger.info("listener_replaced", index=index, migrated=queued)
    return True


class RequeueError(ZionError):
    """A listener whose queue was moved could not be put back: its worker
    (accept(2) failing with EINVAL in a loop) must be replaced."""


def requeue(gen: Generation, index: int) -> int:
    """Move the connections waiting in slot `index`'s accept queue to the
    workers the program picks, and put the listener straight back (see
    zion/demux/requeue.py). Returns how many established connections were
    queued. Needs a SELECT_OR_MIGRATE program: without one the kernel would
    reset them (or, with net.ipv4.tcp_migrate_req, hash them anywhere).

    Between the two calls the slot has no socket in the sockarray, so the
    program's choice of it fails and the kernel hash places the connection
    among the listeners still open: nothing is refused."""
    program = gen.demux.program
    assert gen.demux.migrates and program is not None
    sock = gen.group.sockets[index]
    queued = accept_queue_len(sock)
    stop_listening(sock)
    # Nothing sent to the slot before now is waiting for its worker any more,
    # and nothing is sent to it until it is back in the sockarray.
    gen.board.forget_pending(index)
    try:
        # The port stays: the group's sockets are bound to an explicit port
        # (SOCK_BINDPORT_LOCK, see listeners.bind_group), which tcp_disconnect
        # keeps; an auto-bound one would get a new port here.
        sock.listen(gen.settings.server.backlog)
        sockarray_set(program.sockarray_fd, index, sock)
    except (OSError, ShimError) as exc:
        raise RequeueError(f"listener {index} could not be put back after its queue "
                           f"moved: {exc}") from None
    return queued


def commit(old: Generation, new: Generation) -> None:
    """Swap the new generation's program in (one setsockopt: the kernel
    replaces the group's program atomically) and release the old one."""
    if new.quic is not None and old.quic is not None:
        new.quic.commit(old.quic)
    if new.group is old.group:
        return
    policy.swap(old.demux, new.demux, new.group.sockets[0], new.settings)


def abort(current: Generation, new: Generation) -> None:
    """Undo a reload that failed: sockets bound for it leave the group (the
    running program does not know them, so nothing was routed to them apart
    from the kernel hash when no program is attached) and its program goes."""
    if new.quic is not None and current.quic is not None:
        new.quic.abort(current.quic)
    if new.group is current.group:
        return
    for sock in new.group.sockets[current.count:]:
        sock.close()
    new.demux.close()

