"""Worker processes: fork with an explicit close-list, the ready handshake,
reaping, signalling, boot deadlines. It reports what happened; the master
decides what to do about it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zion.errors import ExitCode
from zion.forking import fork_child
from zion.worker import WorkerSpec

# Notes from the master that must not end a worker still booting (its loop's
# handlers come later, zion/worker.py): ignored until then.
_IGNORED_WHILE_BOOTING = (signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class WorkerHandle:
    index: int
    pid: int
    generation: int
    ready_fd: int  # read end; the worker writes b"R" once it accepts
    started: float
    ready: bool = False
    stopping: bool = False  # asked to stop: its exit is expected
    killed: bool = False  # SIGKILLed for missing its boot deadline: its exit is a failure


class WorkerPool:
    def __init__(self) -> None:
        self.workers: dict[int, WorkerHandle] = {}  # pid -> handle

    def __len__(self) -> int:
        return len(self.workers)

    def handles(self) -> list[WorkerHandle]:
        return list(self.workers.values())

    def of_generation(self, generation: int) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation == generation]

    def spawn(self, index: int, generation: int, sock: socket.socket,
              close_fds: Sequence[int], run: Callable[[WorkerSpec], int]) -> WorkerHandle:
        """Fork a worker that serves `sock`. The child closes `close_fds` (every
        other listener and the master's own descriptors: a listener left open
        in a worker that never accepts on it would keep connections queued with
        nobody to take them) and the other workers' ready pipes."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        # The master's handlers undone in the child before any signal can
        # reach it (zion/forking.py): a SIGTERM the master sends a worker that
        # has just forked (a stop right after boot began) ran the master's
        # handler copied into the child and was lost, and the worker served on
        # until the drain timeout killed it (seen: 5 stops of 12 right after
        # `listening` took the whole 15 s of the test's teardown).
        pid = fork_child(ignore=_IGNORED_WHILE_BOOTING)
        if pid == 0:  # child: never returns into the master's code
            code: int = ExitCode.FAILURE
            try:
                os.close(ready_r)
                siblings = [h.ready_fd for h in self.workers.values() if h.ready_fd >= 0]
                spec = WorkerSpec(index, generation, sock, ready_w,
                                  (*close_fds, *siblings))
                code = run(spec)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        handle = WorkerHandle(index, pid, generation, ready_r, time.monotonic())
        self.workers[pid] = handle
        return handle

    def ready_fds(self) -> dict[int, WorkerHandle]:
        return {h.ready_fd: h for h in self.workers.values() if h.ready_fd >= 0}

    def read_ready(self, handle: WorkerHandle) -> bool | None:
        """True: the worker is serving. False: it closed the pipe without
        saying so (it died; reaping tells how). None: nothing yet."""
        try:
            data = os.read(handle.ready_fd, 16)
        except BlockingIOError:
            return None
        self._close_ready_fd(handle)
        if not data:
            return False
        handle.ready = True
        return True

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """Every worker that exited since the last call, with its exit code
        (negative: the signal that killed it)."""
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            handle = self.workers.pop(pid, None)
            if handle is not None:
                self._close_ready_fd(handle)
                out.append((handle, os.waitstatus_to_exitcode(status)))
        return out

    def stop(self, handle: WorkerHandle, sig: signal.Signals = signal.SIGTERM) -> None:
        handle.stopping = True
        kill(handle.pid, sig)

    def overdue(self, now: float, boot_timeout: float) -> list[WorkerHandle]:
        """Workers still not ready `boot_timeout` seconds after their fork."""
        return [h for h in self.workers.values() if not h.ready and not h.stopping
                and not h.killed and now - h.started > boot_timeout]

    def _close_ready_fd(self, handle: WorkerHandle) -> None:
        if handle.ready_fd >= 0:
            os.close(handle.ready_fd)
            handle.ready_fd = -1


def kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
