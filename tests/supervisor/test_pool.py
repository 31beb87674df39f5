"""The worker pool with real forks and a stand-in for worker.main."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from zion.supervisor.pool import WorkerPool
from zion.worker import WorkerSpec


def _wait_ready(pool: WorkerPool, handle, timeout: float = 10.0) -> bool | None:
    select.select([handle.ready_fd], [], [], timeout)
    return pool.read_ready(handle)


def _reap_all(pool: WorkerPool, count: int, timeout: float = 10.0) -> dict[int, int]:
    out: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(out) < count:
        assert time.monotonic() < deadline, "children did not exit"
        out.update({h.pid: code for h, code in pool.reap()})
        time.sleep(0.01)
    return out


def test_ready_handshake_reap_and_the_close_list():
    pool = WorkerPool()
    report_r, report_w = os.pipe()
    with socket.socket() as a, socket.socket() as b:

        def ready_then_report(spec: WorkerSpec) -> int:
            os.write(spec.ready_fd, b"R")
            fds = ",".join(map(str, spec.close_fds))
            os.write(report_w, f"{spec.index}:{fds}\n".encode())
            return 0

        first = pool.spawn(0, 0, a, [b.fileno()], ready_then_report)
        first_ready_fd = first.ready_fd  # still open in the master: not read yet
        second = pool.spawn(1, 0, b, [a.fileno()], ready_then_report)
        assert _wait_ready(pool, first) is True and first.ready
        assert _wait_ready(pool, second) is True
        codes = _reap_all(pool, 2)
        told = dict(line.split(":") for line in os.read(report_r, 4096).decode().split())
        assert told["0"] == str(b.fileno())
        # The second child also closes its sibling's ready pipe.
        assert told["1"].split(",") == [str(a.fileno()), str(first_ready_fd)]
    os.close(report_r)
    os.close(report_w)
    assert codes == {first.pid: 0, second.pid: 0} and len(pool) == 0
    assert first.ready_fd == second.ready_fd == -1  # the master closed its read ends


def test_a_child_that_dies_before_ready_is_reported_with_its_code():
    pool = WorkerPool()
    with socket.socket() as sock:
        handle = pool.spawn(0, 3, sock, [], lambda spec: 7)
        assert _wait_ready(pool, handle) is False and not handle.ready  # EOF, no "R"
        assert _reap_all(pool, 1) == {handle.pid: 7}


def test_overdue_means_unready_past_the_boot_timeout_and_not_yet_killed_or_stopped():
    pool = WorkerPool()
    with socket.socket() as sock:
        handles = [pool.spawn(i, 0, sock, [], lambda spec: (time.sleep(30), 0)[1])
                   for i in range(3)]
        try:
            now = time.monotonic()
            assert pool.overdue(now, boot_timeout=60) == []
            handles[1].killed = True
            pool.stop(handles[2], signal.SIGKILL)
            assert pool.overdue(now + 61, boot_timeout=60) == [handles[0]]
        finally:
            for h in handles:
                pool.stop(h, signal.SIGKILL)
            codes = _reap_all(pool, 3)
    assert set(codes.values()) == {-signal.SIGKILL}


_STOP_A_BOOTING_CHILD = r"""
import os, signal, socket, time
from zion.supervisor.pool import WorkerPool
from zion.supervisor.signals import HANDLED, SignalQueue

SignalQueue().install()  # the master's handlers, as zion serve has them
pool = WorkerPool()
forked_r, forked_w = os.pipe()

def booting(spec):  # a worker still importing its app: no handler of its own yet
    os.write(forked_w, b"x")
    time.sleep(30)
    return 0

with socket.socket() as sock:
    handle = pool.spawn(0, 0, sock, [], booting)
    print("master mask:", sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                                 if s in HANDLED), flush=True)
    os.read(forked_r, 1)
    os.kill(handle.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reaped = pool.reap()
        if reaped:
            print("exit:", reaped[0][1], flush=True)
            break
        time.sleep(0.01)
    else:
        os.kill(handle.pid, signal.SIGKILL)
        print("exit: lost", flush=True)
"""


def test_a_sigterm_to_a_worker_that_has_just_forked_ends_it():
    # The fork copies the master's handlers: until the child undoes them, a
    # SIGTERM only queued itself in the child's copy of the master's queue,
    # and the worker served on until the drain timeout (a stop right after
    # boot began). Run in a process of its own: it installs the master's handlers.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STOP_A_BOOTING_CHILD], capture_output=True,
                         text=True, timeout=30).stdout
    assert "master mask: []" in out, out  # nothing left blocked in the master
    assert f"exit: {-signal.SIGTERM}" in out, out
