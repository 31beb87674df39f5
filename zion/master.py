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
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zion import log, systemd, worker
from zion.bpf_demux import DemuxOutcome, setup_demux
from zion.config import Settings, worker_count
from zion.errors import ZionError
from zion.listeners import ListenerGroup, bind_group
from zion.status_board import DRAINING, EMPTY, READY, STARTING, StatusBoard
from zion.tls import build_context

logger = log.get_logger("zion.master")

EXIT_OK = 0
EXIT_WORKER_BOOT = 3


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
class _Reload:
    generation: int
    settings: Settings
    ssl_ctx: ssl.SSLContext
    pending: set[int] = field(default_factory=set)  # worker indices not ready yet


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
        self.group: ListenerGroup | None = None
        self.ssl_ctx: ssl.SSLContext | None = None
        self.demux: DemuxOutcome | None = None
        self.board: StatusBoard | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- boot -----------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        self.ssl_ctx, cert_source = build_context(settings.tls)
        self.group = bind_group(settings.server.host, settings.server.port, self.count,
                                settings.server.backlog)
        logger.info("listening", address=self.group.display, port=self.group.port,
                    sockets=self.count, tls=cert_source, app=settings.server.app or None,
                    root=settings.server.root or None)
        # Attach after every listener is bound and before any worker accepts,
        # so the program decides from the very first connection.
        self.demux = setup_demux(settings, self.group)
        self.board = self.demux.board or StatusBoard.anonymous(self.count)
        self._install_signals()
        for index in range(self.count):
            self._spawn(index, self.generation, settings, self.ssl_ctx)
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

    def _spawn(self, index: int, generation: int, settings: Settings,
               ssl_ctx: ssl.SSLContext) -> None:
        assert self.group is not None and self.board is not None and self.demux is not None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        if generation == self.generation:
            self.board.set_state(index, STARTING)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns into the master's code
            code = worker.EXIT_CRASH
            try:
                os.close(ready_r)
                close = [s.fileno() for i, s in enumerate(self.group.sockets) if i != index]
                close += [self._wake_r, self._wake_w, *self.demux.master_fds]
                close += [h.ready_fd for h in self.workers.values()]
                spec = worker.WorkerSpec(index, generation, self.group.sockets[index], ready_w,
                                         tuple(close))
                code = worker.main(spec, settings, ssl_ctx, self.board, self.demux.info())
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
        assert self.board is not None
        self.slots[handle.index].failures = 0
        if self.reload is not None and handle.generation == self.reload.generation:
            self.reload.pending.discard(handle.index)
            if not self.reload.pending:
                self._finish_reload()
            return
        self.board.set_state(handle.index, READY, handle.pid)
        if not self.announced_ready and all(
            h.ready for h in self.workers.values() if h.generation == self.generation
        ) and len(self._current()) == self.count:
            self.announced_ready = True
            logger.info("workers_ready", workers=self.count, generation=self.generation,
                        pids=sorted(h.pid for h in self._current()))
            where = self.group.display if self.group else ""
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
        if self.stopping or handle.stopping:
            logger.debug("worker_exited", index=handle.index, child=handle.pid, status=how)
            return
        if self.reload is not None and handle.generation == self.reload.generation:
            self._abort_reload(f"new worker {handle.index} died before ready ({how})")
            return
        assert self.board is not None
        self.board.set_state(handle.index, EMPTY)
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
                assert self.ssl_ctx is not None
                self._spawn(index, self.generation, self.settings, self.ssl_ctx)

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
        assert self.board is not None
        for index in range(self.count):
            self.board.set_state(index, DRAINING)
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
        try:
            new = self.reload_settings()
            if worker_count(new) != self.count:
                raise ZionError("changing the number of workers needs a restart")
            old = self.settings.server
            if (new.server.host, new.server.port) != (old.host, old.port):
                raise ZionError("changing host or port needs a restart")
            ssl_ctx = self.ssl_ctx
            # Same certificate settings: keep the context, and with it the
            # session-ticket keys, so clients keep resuming across the reload.
            if new.tls != self.settings.tls or ssl_ctx is None:
                ssl_ctx, _ = build_context(new.tls)
        except ZionError as exc:
            logger.error("reload_failed", error=str(exc))
            systemd.notify("READY=1")
            return
        self.generation += 1
        self.reload = _Reload(self.generation, new, ssl_ctx, set(range(self.count)))
        logger.info("reloading", generation=self.generation)
        for index in range(self.count):
            self._spawn(index, self.generation, new, ssl_ctx)

    def _finish_reload(self) -> None:
        assert self.reload is not None and self.board is not None
        reload, self.reload = self.reload, None
        self.settings, self.ssl_ctx = reload.settings, reload.ssl_ctx
        for handle in self.workers.values():
            if handle.generation == reload.generation:
                self.board.set_state(handle.index, READY, handle.pid)
            elif not handle.stopping:
                handle.stopping = True
                self._kill(handle.pid, signal.SIGTERM)
        for slot in self.slots:
            slot.respawn_at = None
        logger.info("reload_complete", generation=reload.generation,
                    pids=sorted(h.pid for h in self._current()))
        systemd.notify("READY=1")

    def _abort_reload(self, why: str) -> None:
        assert self.reload is not None
        generation = self.reload.generation
        self.reload = None
        self.generation -= 1
        for handle in self.workers.values():
            if handle.generation == generation:
                handle.stopping = True
                self._kill(handle.pid, signal.SIGKILL)
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
                self._respawn_due()
                self._check_boot_timeouts()
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

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [s.respawn_at for s in self.slots if s.respawn_at is not None]
        if self.stopping:
            due.append(self.stop_deadline)
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
        if self.group is not None:
            self.group.close()
        if self.demux is not None:
            self.demux.close()
        logger.info("stopped", exit_code=self.exit_code)


def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    """Run a master until it stops; typed errors propagate to the CLI."""
    return Master(settings, reload_settings).run()
