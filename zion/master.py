"""The master: binds the listener group, loads the demux, forks and supervises.

Signal handlers only enqueue; the loop below dispatches to handle_<signal>
methods (so tests and reloads go through the same path). Workers are reaped
with waitpid(-1, WNOHANG) in the loop. A dead worker is replaced on the same
socket after a backoff; a worker that can never start (exit code 3, or
crash_loop_limit failures in a row before becoming ready) stops the master
with one error line instead of respawning forever.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zion import bpf_demux, log, systemd, worker
from zion.bpf_demux import DemuxOutcome, setup_demux
from zion.config import Settings, worker_count
from zion.errors import BindError, ZionError
from zion.listeners import ListenerGroup, accept_queue_len, bind_group, bind_one
from zion.reloader import FileWatcher, watch_dirs
from zion.status_board import DRAINING, EMPTY, READY, STARTING, StatusBoard
from zion.tls import build_context

logger = log.get_logger("zion.master")

EXIT_OK = 0
EXIT_WORKER_BOOT = 3
# How often the master samples the listeners' accept queues for the demux.
_QUEUE_SAMPLE = 0.01


@dataclass
class WorkerHandle:
    index: int
    pid: int
    generation: int
    ready_fd: int  # read end; the worker writes b"R" once it accepts
    started: float
    ready: bool = False
    stopping: bool = False


@dataclass
class _Slot:
    failures: int = 0  # consecutive deaths before becoming ready
    respawn_at: float | None = None


@dataclass
class Layout:
    """What one generation of workers runs on: its listeners, demux, slots."""

    group: ListenerGroup
    demux: DemuxOutcome
    board: StatusBoard

    @property
    def count(self) -> int:
        return len(self.group.sockets)


@dataclass
class _Reload:
    generation: int
    settings: Settings
    ssl_ctx: ssl.SSLContext
    layout: Layout
    pending: set[int] = field(default_factory=set)  # worker indices not ready yet


@dataclass
class _Retiring:
    """A listener the new generation no longer uses, and its old worker."""

    handle: WorkerHandle
    sock: socket.socket
    deadline: float
    signalled: bool = False


class Master:
    def __init__(self, settings: Settings, reload_settings: Callable[[], Settings]) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        self.count = worker_count(settings)
        self.generation = 0
        self.workers: dict[int, WorkerHandle] = {}  # pid -> handle
        self.slots = [_Slot() for _ in range(self.count)]
        self.signals: collections.deque[int] = collections.deque()
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.announced_ready = False
        self.reload: _Reload | None = None
        self.retiring: list[_Retiring] = []
        self.layout: Layout | None = None
        self.ssl_ctx: ssl.SSLContext | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_sample = 0.0
        self.watcher: FileWatcher | None = None

    # -- boot -----------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        self.ssl_ctx, cert_source = build_context(settings.tls)
        group = bind_group(settings.server.host, settings.server.port, self.count,
                           settings.server.backlog)
        logger.info("listening", address=group.display, port=group.port,
                    sockets=self.count, tls=cert_source, app=settings.server.app or None,
                    root=settings.server.root or None)
        # Attach after every listener is bound and before any worker accepts,
        # so the program decides from the very first connection.
        demux = setup_demux(settings, group)
        self.layout = Layout(group, demux, demux.board or StatusBoard.anonymous(self.count))
        self._install_signals()
        for index in range(self.count):
            self._spawn(index, self.generation, settings, self.ssl_ctx, self.layout)
        if settings.server.reload:
            self.watcher = FileWatcher(
                watch_dirs(settings.server.reload_dirs, settings.server.app_dir), self._wake_w)
            self.watcher.start()
        try:
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    # -- workers ----------------------------------------------------------------

    def _held(self) -> tuple[list[socket.socket], list[int]]:
        """Every listener and demux descriptor the master holds right now."""
        layouts = [x for x in (self.layout, self.reload and self.reload.layout) if x]
        socks = {id(s): s for x in layouts for s in x.group.sockets}
        socks.update({id(r.sock): r.sock for r in self.retiring})
        fds = [fd for x in layouts for fd in x.demux.master_fds]
        return list(socks.values()), fds

    def _spawn(self, index: int, generation: int, settings: Settings,
               ssl_ctx: ssl.SSLContext, layout: Layout) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        mine = layout.group.sockets[index]
        board = layout.board
        # A respawn, or a slot on a new layout, is starting. A reload on the same
        # layout is not: the old worker still serves that slot until it hands over.
        if self.reload is None or layout is not self.layout:
            board.set_state(index, STARTING)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns into the master's code
            code = worker.EXIT_CRASH
            try:
                os.close(ready_r)
                # A listener left open in a worker that does not accept on it
                # would keep queued connections alive with no one to take them.
                socks, fds = self._held()
                close = [s.fileno() for s in socks if s is not mine]
                close += [self._wake_r, self._wake_w, *fds]
                close += [h.ready_fd for h in self.workers.values() if h.ready_fd >= 0]
                spec = worker.WorkerSpec(index, generation, mine, ready_w, tuple(close))
                code = worker.main(spec, settings, ssl_ctx, board, layout.demux.info())
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.workers[pid] = WorkerHandle(index, pid, generation, ready_r, time.monotonic())
        logger.debug("worker_spawned", index=index, child=pid, generation=generation)

    def _on_ready_fd(self, handle: WorkerHandle) -> None:
        try:
            data = os.read(handle.ready_fd, 16)
        except BlockingIOError:
            return
        if not data:  # EOF: it died before saying ready; reaping handles it
            self._close_ready_fd(handle)
            return
        handle.ready = True
        self._close_ready_fd(handle)
        assert self.layout is not None
        if self.reload is not None and handle.generation == self.reload.generation:
            self.reload.layout.board.set_state(handle.index, READY, handle.pid)
            self.reload.pending.discard(handle.index)
            if not self.reload.pending:
                self._finish_reload()
            return
        self.slots[handle.index].failures = 0
        self.layout.board.set_state(handle.index, READY, handle.pid)
        if not self.announced_ready and all(
            h.ready for h in self.workers.values() if h.generation == self.generation
        ) and len(self._current()) == self.count:
            self.announced_ready = True
            logger.info("workers_ready", workers=self.count, generation=self.generation,
                        pids=sorted(h.pid for h in self._current()))
            where = self.layout.group.display
            systemd.notify("READY=1", f"STATUS=serving on {where} with {self.count} workers")

    def _close_ready_fd(self, handle: WorkerHandle) -> None:
        if handle.ready_fd >= 0:
            os.close(handle.ready_fd)
            handle.ready_fd = -1

    def _current(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation == self.generation]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            self._close_ready_fd(handle)
            self._worker_exited(handle, status)

    def _worker_exited(self, handle: WorkerHandle, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        retiring = any(r.handle is handle for r in self.retiring)
        if self.stopping or handle.stopping or retiring:
            logger.debug("worker_exited", index=handle.index, child=handle.pid, status=how)
            return
        if self.reload is not None and handle.generation == self.reload.generation:
            self._abort_reload(f"new worker {handle.index} died before ready ({how})")
            return
        assert self.layout is not None
        if handle.index >= self.count:
            return
        self.layout.board.set_state(handle.index, EMPTY)
        slot = self.slots[handle.index]
        if not handle.ready:
            slot.failures += 1
            if code == worker.EXIT_BOOT_ERROR:
                self._fatal(f"worker {handle.index} cannot start (see its worker_boot_failed "
                            "line); not respawning")
                return
            if slot.failures >= self.settings.supervisor.crash_loop_limit:
                self._fatal(f"worker {handle.index} died {slot.failures} times in a row "
                            f"before becoming ready (last: {how})")
                return
        sup = self.settings.supervisor
        delay = min(sup.respawn_backoff * (2 ** max(slot.failures - 1, 0)),
                    sup.respawn_backoff_max) if slot.failures else sup.respawn_backoff
        slot.respawn_at = time.monotonic() + delay
        logger.warning("worker_died", index=handle.index, child=handle.pid, status=how,
                       respawn_in_s=round(delay, 3))

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, slot in enumerate(self.slots):
            if slot.respawn_at is not None and slot.respawn_at <= now and not self.stopping:
                slot.respawn_at = None
                assert self.ssl_ctx is not None and self.layout is not None
                self._spawn(index, self.generation, self.settings, self.ssl_ctx, self.layout)

    def _check_boot_timeouts(self) -> None:
        now = time.monotonic()
        limit = self.settings.supervisor.boot_timeout
        for handle in list(self.workers.values()):
            if not handle.ready and not handle.stopping and now - handle.started > limit:
                logger.error("worker_boot_timeout", index=handle.index, child=handle.pid,
                             timeout_s=limit)
                self._kill(handle.pid, signal.SIGKILL)

    # -- signals ------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        self._begin_stop("SIGTERM")

    def handle_sigint(self) -> None:
        self._begin_stop("SIGINT")

    def handle_sighup(self) -> None:
        if self.stopping:
            return
        if self.reload is not None:
            logger.warning("reload_ignored", reason="a reload is already in progress")
            return
        self._begin_reload()

    def handle_sigchld(self) -> None:
        self._reap()

    def _begin_stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.supervisor.drain_timeout + 5
        systemd.notify("STOPPING=1")
        logger.info("shutting_down", signal=why, workers=len(self.workers),
                    drain_timeout_s=self.settings.supervisor.drain_timeout)
        assert self.layout is not None
        for index in range(self.count):
            self.layout.board.set_state(index, DRAINING)
        for handle in self.workers.values():
            handle.stopping = True
            self._kill(handle.pid, signal.SIGTERM)

    def _fatal(self, message: str) -> None:
        logger.error("fatal", error=message)
        self.exit_code = EXIT_WORKER_BOOT
        self._begin_stop("fatal")

    # -- reload -------------------------------------------------------------------

    def _begin_reload(self) -> None:
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        assert self.layout is not None
        try:
            new = self.reload_settings()
            old = self.settings.server
            if (new.server.host, new.server.port) != (old.host, old.port):
                raise ZionError("changing host or port needs a restart")
            ssl_ctx = self.ssl_ctx
            # Same certificate settings: keep the context, and with it the
            # session-ticket keys, so clients keep resuming across the reload.
            if new.tls != self.settings.tls or ssl_ctx is None:
                ssl_ctx, _ = build_context(new.tls)
            count = worker_count(new)
            layout = self.layout
            if count != self.count or new.demux != self.settings.demux:
                layout = self._new_layout(new, count)
        except ZionError as exc:
            logger.error("reload_failed", error=str(exc))
            systemd.notify("READY=1")
            return
        self.generation += 1
        self.reload = _Reload(self.generation, new, ssl_ctx, layout, set(range(count)))
        logger.info("reloading", generation=self.generation, workers=count,
                    previous_workers=self.count)
        for index in range(count):
            self._spawn(index, self.generation, new, ssl_ctx, layout)

    def _new_layout(self, settings: Settings, count: int) -> Layout:
        """Listeners and a demux for a generation of a different size or policy.

        Slots that stay keep their socket (and its queue); extra ones are new
        sockets in the same group. The new program is loaded now and swapped
        in when the new workers are ready; until then the old one routes."""
        assert self.layout is not None
        old = self.layout.group
        socks = list(old.sockets[:count])
        try:
            while len(socks) < count:
                socks.append(bind_one(old.host, old.port, old.family, settings.server.backlog))
        except BindError:
            for sock in socks[len(old.sockets):]:
                sock.close()
            raise
        group = ListenerGroup(tuple(socks), old.host, old.port, old.family)
        demux = setup_demux(settings, group, attach=False, previous=self.layout.demux)
        if count < self.count and demux.state != "prepared":
            migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
            if migrate.exists() and migrate.read_text().strip() == "0":
                logger.warning(
                    "reload_shrink_without_demux",
                    hint="without the demux the kernel hash keeps queueing connections on "
                    "the listeners being retired; sysctl -w net.ipv4.tcp_migrate_req=1 makes "
                    "the kernel move them to the others when those listeners close")
        return Layout(group, demux, demux.board or StatusBoard.anonymous(count))

    def _finish_reload(self) -> None:
        assert self.reload is not None and self.layout is not None
        reload, self.reload = self.reload, None
        old, new = self.layout, reload.layout
        self.settings, self.ssl_ctx = reload.settings, reload.ssl_ctx
        if new is not old:
            sock0 = new.group.sockets[0]
            if new.demux.state == "prepared":
                bpf_demux.attach_prepared(new.demux, sock0, new.count, reload.settings)
                if new.demux.state == "attached":
                    bpf_demux.hand_over(old.demux, new.demux)
            if new.demux.state != "attached" and old.demux.state == "attached":
                bpf_demux.detach(sock0)
            self.layout = new
        now = time.monotonic()
        for handle in self.workers.values():
            if handle.generation == reload.generation or handle.stopping:
                continue
            if new is not old and handle.index >= new.count:
                # Retired listener: its worker keeps accepting until the kernel
                # queue on it is empty (the new program sends it nothing more).
                old.board.set_state(handle.index, DRAINING)
                self.retiring.append(_Retiring(handle, old.group.sockets[handle.index],
                                               now + self.settings.supervisor.drain_timeout))
            else:
                handle.stopping = True
                self._kill(handle.pid, signal.SIGTERM)
        if new is not old:
            old.demux.close()
        self.count = new.count
        self.slots = [_Slot() for _ in range(self.count)]
        self._check_retiring()
        logger.info("reload_complete", generation=reload.generation,
                    pids=sorted(h.pid for h in self._current()))
        systemd.notify("READY=1")

    def _check_retiring(self) -> None:
        assert self.layout is not None
        routed = self.layout.demux.state == "attached"
        now = time.monotonic()
        for r in list(self.retiring):
            if not r.signalled and (not routed or accept_queue_len(r.sock) == 0
                                    or now > r.deadline):
                # Without the program nothing stops the kernel hash from queueing
                # here, so waiting for an empty queue could last forever.
                r.signalled = True
                self._kill(r.handle.pid, signal.SIGTERM)
            if r.handle.pid not in self.workers:
                r.sock.close()
                self.retiring.remove(r)
                logger.info("listener_retired", index=r.handle.index, remaining=self.count)

    def _abort_reload(self, why: str) -> None:
        assert self.reload is not None
        generation = self.reload.generation
        if self.layout is not None and self.reload.layout is not self.layout:
            extra = self.reload.layout.group.sockets[self.count:]
            self.reload.layout.demux.close()
        else:
            extra = ()
        self.reload = None
        self.generation -= 1
        for handle in self.workers.values():
            if handle.generation == generation:
                handle.stopping = True
                self._kill(handle.pid, signal.SIGKILL)
        # Sockets bound for the aborted generation leave the group; nothing was
        # routed to them (the old program does not know them), apart from the
        # kernel hash when no program is attached.
        for sock in extra:
            sock.close()
        logger.error("reload_failed", error=why, kept_generation=self.generation)
        systemd.notify("READY=1")

    # -- loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            while self.signals:
                name = signal.Signals(self.signals.popleft()).name.lower()
                getattr(self, f"handle_{name}")()
            self._reap()
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() > self.stop_deadline:
                    for pid in list(self.workers):
                        logger.warning("worker_killed", child=pid, reason="drain timeout")
                        self._kill(pid, signal.SIGKILL)
                    self.stop_deadline = float("inf")
            else:
                if self.watcher is not None and self.reload is None and self.watcher.take():
                    self._begin_reload()
                self._respawn_due()
                self._check_boot_timeouts()
                if self.retiring:
                    self._check_retiring()
                self._sample_queues()
            ready = {h.ready_fd: h for h in self.workers.values() if h.ready_fd >= 0}
            try:
                readable, _, _ = select.select([self._wake_r, *ready], [], [],
                                               self._timeout())
            except InterruptedError:
                continue
            for fd in readable:
                if fd == self._wake_r:
                    self._drain_wakeup()
                elif fd in ready:
                    self._on_ready_fd(ready[fd])

    def _sample_queues(self) -> None:
        """Publish each listener's accept queue for the program's load figure.

        Only the master can see a frozen worker's queue grow (the worker is
        frozen); a real sample also resets the program's per-dispatch guesses,
        so nothing drifts (connections whose client left before the handshake
        are counted once, then gone)."""
        layout = self.layout
        if layout is None or layout.demux.state != "attached":
            return
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + _QUEUE_SAMPLE
        slots = layout.board.slots
        for index, sock in enumerate(layout.group.sockets):
            slots[index].backlog = accept_queue_len(sock)

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [s.respawn_at for s in self.slots if s.respawn_at is not None]
        if self.layout is not None and self.layout.demux.state == "attached":
            due.append(self._next_sample)
        if self.stopping:
            due.append(self.stop_deadline)
        if self.retiring:
            due.append(now + 0.02)  # poll the retiring listeners' queues
        return max(0.0, min([*due, now + 0.5]) - now)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _cleanup(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for r in self.retiring:
            r.sock.close()
        if self.layout is not None:
            self.layout.group.close()
            self.layout.demux.close()
        logger.info("stopped", exit_code=self.exit_code)


def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    """Run a master until it stops; typed errors propagate to the CLI."""
    return Master(settings, reload_settings).run()
