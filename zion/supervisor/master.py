"""The master loop: select on the signal queue and the workers' ready pipes,
route each event to the part that owns it, and act on what comes back.

It owns only stopping and the exit code. Workers are reaped with
waitpid(-1, WNOHANG) in the loop; a dead worker is replaced on the same
socket (so connections queued on it are not lost) when the respawn policy
says so, and a worker that can never start stops the master with one error
line instead of respawning forever.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from zion import caps, listeners, log, privileges, worker
from zion.admin import routes
from zion.admin.health import Phase, StallWatch, WorkerHealth, agent_line
from zion.admin.listener import AdminListeners, Kind
from zion.admin.listener import bind as bind_admin
from zion.admin.view import HostView, host_view, read_workers
from zion.counters import CounterBoard, SupervisorCounters
from zion.demux.board import SlotState
from zion.demux.requeue import QueueMover
from zion.demux.sampler import QueueSampler
from zion.errors import BindError, ExitCode, ZionError
from zion.settings import Settings
from zion.supervisor import generation, notify
from zion.supervisor.generation import Generation, Reload, Step
from zion.supervisor.limits import MIB, Memory, RssReader, memory_verdict, stuck_slots
from zion.supervisor.pool import WorkerHandle, WorkerPool, kill
from zion.supervisor.reloader import FileWatcher, globs, watch_dirs
from zion.supervisor.respawn import GiveUp, RespawnPolicy, describe
from zion.supervisor.retiring import Retiring
from zion.supervisor.signals import SignalQueue

logger = log.get_logger("zion.master")

# A stop that outlives the drain timeout by this much gets SIGKILL.
_STOP_GRACE = 5.0
# Seconds between reads of the workers' RSS (--limit-worker-memory): one
# pread per worker (limits.RssReader). What a leak grows between two reads is
# what it overshoots the limit by, and it must stay below the hard ceiling
# (limits.HARD_FACTOR), or the worker is killed with requests in flight. A
# pace that quickened only once growth was seen missed a worker idle at one
# read and leaking at the next: one client leaking 4 MiB a request took a
# fresh worker from under 80 % of 100 MiB to past 150 MiB in 250 ms.
_MEMORY_CHECK = 0.02


class Master:
    def __init__(self, settings: Settings, reload_settings: Callable[[], Settings]) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        self.signals = SignalQueue()
        self.pool = WorkerPool()
        self.retiring = Retiring()
        self.current: Generation | None = None
        self.reload: Reload | None = None
        self.respawn: RespawnPolicy | None = None
        self.watcher: FileWatcher | None = None
        self.stopping = False
        self.stop_deadline = 0.0
        # --shutdown-delay: when the drain starts (None: no stop asked for).
        self.leave_at: float | None = None
        self.leave_why = ""
        self.exit_code = ExitCode.OK
        self.announced_ready = False
        self.sampler = QueueSampler()
        self.mover = QueueMover(settings.demux.heartbeat_interval_ms / 1000)
        self.rotate_at = self._next_rotation()
        # Made before the first fork: every worker of every generation shares it.
        self.counters = CounterBoard()
        self.tallies = SupervisorCounters()
        self.admin = AdminListeners(None, None)
        self.uds: socket.socket | None = None  # --uds, shared by all workers
        self.stall_watch = StallWatch()
        self.stall_check_at = 0.0
        # --limit-worker-memory: slot -> the old worker a replacement is
        # starting for (it serves until the replacement is ready).
        self.replacing: dict[int, WorkerHandle] = {}
        self.memory_check_at = 0.0
        self.rss = RssReader()

    # -- boot -------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        gen, cert_source = generation.first(settings)
        self.current = gen
        # Only the fields that say something: logfmt renders None as `app=`.
        optional = {"app": settings.server.app, "root": settings.server.root,
                    "proxy_protocol": (settings.server.proxy_protocol.value
                                       if settings.server.proxy_protocol != "off" else None)}
        logger.info("listening", address=gen.group.display, port=gen.group.port,
                    sockets=gen.count, tls=cert_source,
                    **{key: value for key, value in optional.items() if value})
        self.respawn = RespawnPolicy(settings.supervisor, gen.count)
        try:
            # Before the master gives up its capabilities (a port below 1024).
            self.admin = _bind_admin(settings)
            if settings.server.uds:
                # Bound once, inherited by every worker of every generation.
                self.uds = listeners.bind_unix(settings.server.uds, settings.server.backlog)
                logger.info("listening_uds", path=settings.server.uds, demux="none")
        except BindError:
            gen.group.close()
            gen.demux.close()
            if gen.quic is not None:
                gen.quic.close()
            self.admin.close()
            raise
        try:
            kept = privileges.restrict_master()
            logger.debug("master_capabilities", kept=sorted(caps.name(c) for c in kept))
        except OSError as exc:
            logger.warning("master_capability_drop_failed", error=str(exc))
        self.signals.install()
        for index in range(gen.count):
            self._spawn(gen, index)
        if settings.server.reload:
            self.watcher = FileWatcher(
                watch_dirs(settings.server.reload_dirs, settings.server.app_dir),
                self.signals.wake_w, ["*.py", *globs(settings.server.reload_include)],
                globs(settings.server.reload_exclude))
            self.watcher.start()
        try:
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    # -- the loop -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            while (sig := self.signals.pop()) is not None:
                getattr(self, f"handle_{sig.name.lower()}")()
            self._reaped()
            # One clock read per wake: what is due is judged against it (a
            # check that runs late by this wake's own work loses nothing).
            now = time.monotonic()
            if self.stopping:
                if not self.pool:
                    return
                if now > self.stop_deadline:
                    for handle in self.pool.handles():
                        logger.warning("worker_killed", child=handle.pid, reason="drain timeout")
                        kill(handle.pid, signal.SIGKILL)
                    self.stop_deadline = float("inf")
            else:
                if self.leave_at is not None and now >= self.leave_at:
                    self._begin_drain(self.leave_why)
                    continue
                if self.watcher is not None and self.reload is None and self.watcher.take():
                    self._begin_reload()
                if self.reload is None and now >= self.rotate_at:
                    # Next attempt a lifetime from now even if this one fails.
                    self.rotate_at = self._next_rotation()
                    logger.info("ticket_keys_rotating", lifetime_s=self._key_lifetime())
                    self._begin_reload()
                assert self.respawn is not None
                if self.respawn.due:
                    self._respawn_due()
                self._boot_deadlines()
                if self.retiring:
                    self._check_retiring()
                self._demux_looks(now)
                if self.reload is None:
                    if self.settings.supervisor.stuck_timeout:
                        self._replace_stuck()
                    if self.settings.limits.worker_memory and now >= self.memory_check_at:
                        self._check_memory()
            if self.admin and now >= self.stall_check_at:
                self._watch_stalls()
            ready = self.pool.ready_fds()
            if self.admin:
                admin_r, admin_w = self.admin.read_fds(), self.admin.write_fds()
            else:
                admin_r = admin_w = []
            try:
                readable, writable, _ = select.select(
                    [self.signals.wake_r, *ready, *admin_r], admin_w, [], self._timeout())
            except InterruptedError:
                continue
            for fd in readable:
                if fd == self.signals.wake_r:
                    self.signals.drain_wakeups()
                elif fd in ready:
                    self._on_ready_fd(ready[fd])
            if self.admin:
                self._serve_admin([fd for fd in readable if fd in admin_r], writable)

    def _key_lifetime(self) -> float:
        # Without TLS there are no ticket keys to rotate.
        tls = self.settings.tls
        return tls.ticket_key_lifetime if tls.enabled else 0.0

    def _next_rotation(self) -> float:
        lifetime = self._key_lifetime()
        return time.monotonic() + lifetime if lifetime else float("inf")

    def _timeout(self) -> float:
        now = time.monotonic()
        due = min(now + 0.5, self.rotate_at)
        if self.respawn is not None and self.respawn.due:
            due = min(due, *self.respawn.due.values())
        # Both run only while serving: counted while stopping, their past
        # due times would turn select into a busy loop until the workers exit.
        gen = self.current
        if gen is not None and not self.stopping and gen.demux.routing:
            due = min(due, self.sampler.next_at)
            if self._moving_queues():
                due = min(due, self.mover.next_at)
        if self.stopping:
            due = min(due, self.stop_deadline)
        elif self.leave_at is not None:
            due = min(due, self.leave_at)
        if not self.stopping and self.settings.limits.worker_memory:
            due = min(due, self.memory_check_at)
        if self.retiring:
            due = min(due, now + 0.02)  # poll the retiring listeners' queues
        if self.admin:
            due = min(due, self.stall_check_at)
            if (at := self.admin.next_deadline()) is not None:
                due = min(due, at)
        return max(0.0, due - now)

    # -- signals ------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        self._begin_stop("SIGTERM")

    def handle_sigint(self) -> None:
        self._begin_stop("SIGINT")

    def handle_sighup(self) -> None:
        if self.stopping or self.leave_at is not None:
            return
        if self.reload is not None:
            logger.warning("reload_ignored", reason="a reload is already in progress")
            return
        self._begin_reload()

    def handle_sigchld(self) -> None:
        self._reaped()

    # -- workers ------------------------------------------------------------------

    def _spawn(self, gen: Generation, index: int) -> None:
        # A respawn, or a slot on a new group, is starting. A reload on the same
        # group is not: the old worker still serves that slot until it hands over.
        assert self.current is not None
        if self.reload is None or gen.group is not self.current.group:
            gen.board.set_state(index, SlotState.STARTING)
        mine = gen.group.sockets[index]
        quic = gen.quic.for_worker(index) if gen.quic is not None else None
        close = [s.fileno() for s in self._held_sockets()
                 if s is not mine and (quic is None or s is not quic.sock)]
        close += [*self.signals.fds, *self._held_demux_fds(), *self.admin.fds(),
                  *self.rss.fds.values()]
        settings, ssl_ctx, board, info = gen.settings, gen.ssl_ctx, gen.board, gen.demux.info()
        counters, uds = self.counters, self.uds
        handle = self.pool.spawn(
            index, gen.number, mine, close,
            lambda spec: worker.main(spec, settings, ssl_ctx, board, info, counters, uds, quic))
        logger.debug("worker_spawned", index=index, child=handle.pid, generation=gen.number)

    def _held_sockets(self) -> list[socket.socket]:
        gens = [g for g in (self.current, self.reload and self.reload.new) if g]
        socks = {id(s): s for g in gens for s in g.group.sockets}
        socks.update({id(s): s for g in gens if g.quic for s in g.quic.udp.sockets})
        socks.update({id(s): s for s in self.retiring.sockets()})
        return list(socks.values())

    def _held_demux_fds(self) -> list[int]:
        gens = [g for g in (self.current, self.reload and self.reload.new) if g]
        return [fd for g in gens for fd in g.master_fds()]

    def _on_ready_fd(self, handle: WorkerHandle) -> None:
        ready = self.pool.read_ready(handle)
        if not ready:
            return  # nothing yet, or it died first: reaping says how
        assert self.current is not None and self.respawn is not None
        if self.reload is not None and handle.generation == self.reload.new.number:
            self.reload.new.board.set_state(handle.index, SlotState.READY, handle.pid)
            if self.reload.on_ready(handle.index) is Step.COMMIT:
                self._commit_reload()
            return
        self.respawn.on_ready(handle.index)
        self.current.board.set_state(handle.index, SlotState.READY, handle.pid)
        if (old := self.replacing.pop(handle.index, None)) is not None:
            # The replacement accepts on the same listener now: the old one
            # drains what it holds and exits.
            logger.info("worker_replaced", index=handle.index, child=old.pid,
                        replacement=handle.pid)
            self.pool.stop(old)
        if self.leave_at is not None:
            kill(handle.pid, signal.SIGUSR1)  # a respawn during --shutdown-delay
        current = self.pool.of_generation(self.current.number)
        if not self.announced_ready and len(current) == self.current.count and all(
                h.ready for h in current):
            self.announced_ready = True
            logger.info("workers_ready", workers=self.current.count,
                        generation=self.current.number, pids=sorted(h.pid for h in current))
            notify.notify("READY=1", f"STATUS=serving on {self.current.group.display} with "
                          f"{self.current.count} workers")

    def _reaped(self) -> None:
        for handle, code in self.pool.reap():
            self._worker_exited(handle, code)

    def _worker_exited(self, handle: WorkerHandle, code: int) -> None:
        how = describe(code)
        if self.stopping or handle.stopping or self.retiring.holds(handle):
            logger.debug("worker_exited", index=handle.index, child=handle.pid, status=how)
            return
        self._replacement_died(handle, how)
        if self.reload is not None and handle.generation == self.reload.new.number:
            if self.reload.on_death(handle.index) is Step.ABORT:
                self._abort_reload(f"new worker {handle.index} died before ready ({how})")
            return
        assert self.current is not None and self.respawn is not None
        if handle.index >= self.current.count:
            return
        self.current.board.set_state(handle.index, SlotState.EMPTY)
        # With SELECT_OR_MIGRATE its queue moves to live workers now.
        if (self.reload is None and not self.stopping
                and generation.hand_over_queue(self.current, handle.index)):
            self.sampler.forget(handle.index)
        verdict = self.respawn.on_death(handle.index, handle.ready, code, time.monotonic())
        if isinstance(verdict, GiveUp):
            self._fatal(verdict.reason)
            return
        if code == ExitCode.RECYCLED:
            logger.info("worker_recycled", index=handle.index, child=handle.pid)
            return
        logger.warning("worker_died", index=handle.index, child=handle.pid, status=how,
                       respawn_in_s=round(verdict.delay, 3))

    def _serving_handle(self, gen: Generation, index: int) -> WorkerHandle | None:
        """The ready worker serving a slot of `gen`, not one being stopped."""
        pid = int(gen.board.slots[index].pid)
        handle = self.pool.workers.get(pid)
        if (handle is None or handle.stopping or not handle.ready
                or handle.generation != gen.number or handle.index != index):
            return None
        return handle

    def _replace_stuck(self) -> None:
        """--timeout-worker-stuck: a worker whose loop has not turned for that
        long is killed (a blocked loop cannot run a SIGTERM handler) and
        replaced like any dead worker; its accept queue moves to the others
        (hand_over_queue). Its stack was logged by its own watchdog
        (zion/watchdog.py) when it first stalled."""
        timeout = self.settings.supervisor.stuck_timeout
        gen = self.current
        if not timeout or gen is None:
            return
        for index, blocked in stuck_slots(gen.board, range(gen.count), time.monotonic_ns(),
                                          timeout):
            handle = self._serving_handle(gen, index)
            if handle is None:
                continue
            logger.error("worker_stuck", index=index, child=handle.pid,
                         blocked_s=round(blocked, 2), timeout_s=timeout,
                         action="killed and replaced; its worker_blocked line has the stack")
            self.tallies.stuck[index] = self.tallies.stuck.get(index, 0) + 1
            # No longer READY: the program sends it nothing while it dies.
            gen.board.set_state(index, SlotState.DRAINING)
            kill(handle.pid, signal.SIGKILL)

    def _check_memory(self) -> None:
        """--limit-worker-memory, every _MEMORY_CHECK: a worker past the limit
        gets a replacement on its own listener and takes no new connection;
        once the replacement is ready it drains (_on_ready_fd). Past the hard
        ceiling it is killed, draining or not."""
        limit = self.settings.limits.worker_memory
        gen = self.current
        now = time.monotonic()
        if not limit or gen is None or now < self.memory_check_at:
            return
        self.memory_check_at = now + _MEMORY_CHECK
        self.rss.keep_only(self.pool.workers)
        for handle in self.pool.of_generation(gen.number):
            if not handle.ready:
                continue
            rss = self.rss.rss(handle.pid)
            if rss is None:
                continue
            verdict = memory_verdict(rss, limit)
            if verdict is Memory.OK:
                continue
            # A worker that drains still answers what it holds, and the
            # ceiling is there for a leak that would outgrow the host before
            # the drain ends: once its replacement was ready, a worker past
            # its limit was no longer looked at and grew unchecked.
            if handle.stopping and verdict is not Memory.CEILING:
                continue
            rss_mib = round(rss / MIB, 1)
            index = handle.index
            if verdict is Memory.CEILING:
                logger.error("worker_memory_killed", index=index, child=handle.pid,
                             rss_mib=rss_mib, limit_mib=limit)
                if self.replacing.get(index) is handle:
                    handle.stopping = True  # its replacement is on the way
                kill(handle.pid, signal.SIGKILL)
            elif index not in self.replacing:
                logger.warning("worker_memory_limit", index=index, child=handle.pid,
                               rss_mib=rss_mib, limit_mib=limit,
                               action="replacing; it drains once the replacement is ready")
                self.tallies.memory[index] = self.tallies.memory.get(index, 0) + 1
                self.replacing[index] = handle
                # It takes no new connection and keeps none alive from now
                # on; the program sends new ones elsewhere (the slot is
                # STARTING), and the kernel queues the rest on its listener
                # for the replacement.
                kill(handle.pid, signal.SIGUSR2)
                self._spawn(gen, index)

    def _replacement_died(self, handle: WorkerHandle, how: str) -> None:
        """A memory replacement died before it was ready. The old worker took
        no connection since SIGUSR2 (it is past its limit): it drains, and the
        slot is respawned like that of any worker that died, the failure
        counted by the crash-loop policy (the caller goes on to it)."""
        old = self.replacing.get(handle.index)
        if old is None or old is handle or handle.ready or self.current is None:
            return
        if handle.generation != self.current.number:
            return
        del self.replacing[handle.index]
        logger.warning("worker_replacement_died", index=handle.index, child=handle.pid,
                       status=how, draining=old.pid)
        self.pool.stop(old)

    def _respawn_due(self) -> None:
        assert self.respawn is not None and self.current is not None
        for index in self.respawn.take_due(time.monotonic()):
            self.tallies.respawned(index)
            self._spawn(self.current, index)

    def _boot_deadlines(self) -> None:
        limit = self.settings.supervisor.boot_timeout
        for handle in self.pool.overdue(time.monotonic(), limit):
            logger.error("worker_boot_timeout", index=handle.index, child=handle.pid,
                         timeout_s=limit)
            # Not `stopping`: its death is a failure before ready, counted by
            # the respawn policy like any other.
            handle.killed = True
            kill(handle.pid, signal.SIGKILL)

    def _demux_looks(self, now: float) -> None:
        """The sampler's look at the accept queues and the mover's at the
        workers, each when due, while the program routes. Only the program
        routes on the sample, but /_zion/status shows it in every mode, and
        in hash mode a frozen worker's queue is worth seeing."""
        gen = self.current
        if gen is None or not gen.demux.routing:
            return
        ahead = 0.0
        if now >= self.mover.next_at and self._moving_queues():
            self._move_blocked_queues(gen, now)
            # A sample due before the mover's next look is taken now: one
            # wake-up for both instead of one each (under new connections
            # the mover looks every 10-40 ms, the sampler every 100).
            ahead = self.mover.next_at - now
        if now + ahead >= self.sampler.next_at:
            self.sampler.maybe_sample(now, gen.group.sockets, gen.board, ahead)

    def _moving_queues(self) -> bool:
        # Needs SELECT_OR_MIGRATE (the program re-homes what the listener
        # held); not during a reload, whose commit may change the group.
        gen = self.current
        return (gen is not None and gen.demux.migrates and gen.settings.demux.requeue
                and self.reload is None and not self.stopping)

    def _move_blocked_queues(self, gen: Generation, now: float) -> None:
        look = self.mover.poll(now, time.monotonic_ns(), gen.board, gen.group.sockets)
        if not look.move:
            return
        # Not READY while the queues move: the program sends what migrates
        # (and new connections) to the workers that turn, not back to a
        # blocked one, nor to a slot whose socket is out of the sockarray.
        board = gen.board
        for index in look.blocked:
            board.set_state(index, SlotState.DRAINING)
        failed = set()
        try:
            for index in look.move:
                try:
                    moved = generation.requeue(gen, index)
                except generation.RequeueError as exc:
                    failed.add(index)
                    self._replace_broken_listener(gen, index, str(exc))
                    continue
                self.sampler.forget(index)
                self.tallies.moved(index, moved)
                logger.debug("queue_moved", index=index, connections=moved)
        finally:
            for index in look.blocked:
                if index not in failed:
                    board.set_state(index, SlotState.READY)

    def _replace_broken_listener(self, gen: Generation, index: int, error: str) -> None:
        # Its worker would spin on accept(2) failing on a socket that does not
        # listen: the slot gets a fresh listener now (hand_over_queue, as for
        # a dead worker) and the worker is replaced; its death sets the slot
        # EMPTY, and the respawn serves the fresh socket.
        logger.error("requeue_failed", index=index, error=error,
                     action="listener and worker replaced")
        generation.hand_over_queue(gen, index)
        self.sampler.forget(index)
        for handle in self.pool.handles():
            if handle.generation == gen.number and handle.index == index:
                kill(handle.pid, signal.SIGKILL)

    # -- admin --------------------------------------------------------------------

    def _phase(self) -> Phase:
        if self.stopping or self.leave_at is not None:
            return Phase.STOPPING
        if self.reload is not None:
            return Phase.RELOADING
        return Phase.SERVING if self.announced_ready else Phase.STARTING

    def _host_view(self) -> HostView:
        gen = self.current
        assert gen is not None
        workers = read_workers(gen.board, gen.group.sockets, gen.settings.demux.stall_threshold_ms)
        self._count_stalls(workers)  # so a view that shows a stall has counted it
        return host_view(self._phase(), gen.number, gen.board, workers, self.counters,
                         self.tallies, gen.demux.info(), gen.demux.routing,
                         gen.settings.limits.max_connections, gen.settings.limits.concurrency)

    def _serve_admin(self, readable: list[int], writable: list[int]) -> None:
        for req in self.admin.on_ready(readable, writable, time.monotonic()):
            view = self._host_view()
            if req.kind is Kind.AGENT:
                self.admin.reply_line(req, agent_line(view.phase, view.workers,
                                                      view.max_connections, view.concurrency))
            else:
                self.admin.reply(req, routes.answer(req.method, req.path, view))

    def _watch_stalls(self) -> None:
        """Counts stalls for /metrics: a worker that is ready but whose
        heartbeat went stale, checked twice per stall threshold."""
        now = time.monotonic()
        if not self.admin or now < self.stall_check_at or self.current is None:
            return
        threshold = self.current.settings.demux.stall_threshold_ms
        self.stall_check_at = now + max(0.01, threshold / 2000)
        self._count_stalls(read_workers(self.current.board, (), threshold))

    def _count_stalls(self, workers: list[WorkerHealth]) -> None:
        for index in self.stall_watch.observe(workers):
            self.tallies.stalls[index] = self.tallies.stalls.get(index, 0) + 1
            logger.info("worker_stalled", index=index, child=workers[index].pid,
                        heartbeat_age_ms=workers[index].heartbeat_age_ms)

    # -- stop ---------------------------------------------------------------------

    def _begin_stop(self, why: str) -> None:
        """SIGTERM/SIGINT: with --shutdown-delay, readiness fails now and the
        drain starts later; a second signal starts it at once."""
        if self.stopping:
            return
        delay = self.settings.supervisor.shutdown_delay
        if self.leave_at is not None or not delay or why == "fatal":
            self._begin_drain(why)
            return
        self.leave_at = time.monotonic() + delay
        self.leave_why = why
        logger.info("shutdown_delayed", signal=why, delay_s=delay,
                    hint="readiness answers 503; listeners keep serving until the drain")
        # Each worker's /_zion/ready answers 503 from now on (the admin /ready
        # and the agent follow the phase).
        # Only ready ones: SIGUSR1's default action would end a booting one.
        for handle in self.pool.handles():
            if handle.ready:
                kill(handle.pid, signal.SIGUSR1)

    def _begin_drain(self, why: str) -> None:
        self.leave_at = None
        self.stopping = True
        drain = self.settings.supervisor.drain_timeout
        self.stop_deadline = time.monotonic() + drain + _STOP_GRACE
        notify.notify("STOPPING=1")
        logger.info("shutting_down", signal=why, workers=len(self.pool), drain_timeout_s=drain)
        assert self.current is not None
        for index in range(self.current.count):
            self.current.board.set_state(index, SlotState.DRAINING)
        for handle in self.pool.handles():
            self.pool.stop(handle)

    def _fatal(self, message: str) -> None:
        logger.error("fatal", error=message)
        self.exit_code = ExitCode.WORKER_BOOT
        self._begin_stop("fatal")

    # -- reload -------------------------------------------------------------------

    def _begin_reload(self) -> None:
        notify.notify("RELOADING=1", notify.monotonic_usec())
        assert self.current is not None
        try:
            self.reload = generation.begin(self.current, self.reload_settings())
        except ZionError as exc:
            self.tallies.reload_failures += 1
            logger.error("reload_failed", error=str(exc))
            notify.notify("READY=1")
            return
        new = self.reload.new
        logger.info("reloading", generation=new.number, workers=new.count,
                    previous_workers=self.current.count)
        for index in range(new.count):
            self._spawn(new, index)

    def _commit_reload(self) -> None:
        assert self.reload is not None and self.current is not None
        old, new = self.current, self.reload.new
        self.reload = None
        self.tallies.reloads += 1
        self.rotate_at = self._next_rotation()  # new context, new ticket keys
        generation.commit(old, new)
        self.current, self.settings = new, new.settings
        self.replacing.clear()  # old workers and their replacements: all stopped below
        if new.board is not old.board:
            self.sampler.reset()
        self.mover = QueueMover(new.settings.demux.heartbeat_interval_ms / 1000)
        now = time.monotonic()
        migrates = new.group is not old.group and generation.closing_migrates(new)
        for handle in self.pool.handles():
            if handle.generation == new.number or handle.stopping:
                continue
            if new.group is not old.group and handle.index >= new.count:
                # Retired listener: its worker keeps accepting until the kernel
                # queue on it is empty (the new program sends it nothing more).
                old.board.set_state(handle.index, SlotState.DRAINING)
                retired = old.group.sockets[handle.index]
                if migrates:
                    # The new program is in: the kernel moves this listener's
                    # queue to the workers it (or its hash) picks, now, not
                    # once its worker has drained it.
                    generation.stop_listening(retired)
                self.retiring.add(handle, retired, now + self.settings.supervisor.drain_timeout)
            else:
                self.pool.stop(handle)
        assert self.respawn is not None
        self.respawn = RespawnPolicy(new.settings.supervisor, new.count)
        self._check_retiring()
        logger.info("reload_complete", generation=new.number,
                    pids=sorted(h.pid for h in self.pool.of_generation(new.number)))
        notify.notify("READY=1")

    def _abort_reload(self, why: str) -> None:
        assert self.reload is not None and self.current is not None
        new = self.reload.new
        self.reload = None
        self.tallies.reload_failures += 1
        for handle in self.pool.of_generation(new.number):
            # A new worker that is ready has been accepting on a listener it
            # shares with the running generation: SIGTERM lets it finish what
            # it took (it drains). One that is not ready holds nothing yet.
            self.pool.stop(handle, signal.SIGTERM if handle.ready else signal.SIGKILL)
        if new.board is self.current.board:
            # Same listeners, same status slots: they show the running workers again.
            for handle in self.pool.of_generation(self.current.number):
                if handle.ready:
                    self.current.board.set_state(handle.index, SlotState.READY, handle.pid)
        generation.abort(self.current, new)
        logger.error("reload_failed", error=why, kept_generation=self.current.number)
        notify.notify("READY=1")

    def _check_retiring(self) -> None:
        assert self.current is not None
        routed = self.current.demux.routing
        for handle in self.retiring.to_stop(routed, time.monotonic()):
            kill(handle.pid, signal.SIGTERM)
        for r in self.retiring.collect(lambda pid: pid in self.pool.workers):
            logger.info("listener_retired", index=r.handle.index, remaining=self.current.count)

    # -- exit -----------------------------------------------------------------------

    def _cleanup(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.admin.close()
        self.retiring.close_all()
        if self.current is not None and self.reload is not None:
            # Stopped mid-reload: the new generation's extra sockets and program.
            generation.abort(self.current, self.reload.new)
        if self.current is not None:
            self.current.group.close()
            self.current.demux.close()
            if self.current.quic is not None:
                self.current.quic.close()
        if self.uds is not None:
            self.uds.close()
            with contextlib.suppress(OSError):
                os.unlink(self.settings.server.uds)
        logger.info("stopped", exit_code=int(self.exit_code))


def _bind_admin(settings: Settings) -> AdminListeners:
    admin = settings.admin
    http = bind_admin(admin.listen, "admin") if admin.listen else None
    try:
        agent = bind_admin(admin.agent, "agent") if admin.agent else None
    except BindError:
        if http is not None:
            http.close()
        raise
    listeners = AdminListeners(http, agent)
    for kind, event in ((Kind.HTTP, "admin_listening"), (Kind.AGENT, "agent_listening")):
        if (address := listeners.address(kind)) is not None:
            logger.info(event, address=address[0], port=address[1])
    return listeners


def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    """Run a master until it stops; typed errors propagate to the CLI."""
    return Master(settings, reload_settings).run()
