"""zion.forking.fork_child: a child of the master with the master's signal
handlers undone, for the pool's workers and the demux and QUIC compile helpers."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import REPO

# Run in a process of its own: it installs the master's handlers.
_CHILD_GETS = r"""
import os, signal, sys, time
from zion.forking import MASTER_SIGNALS, fork_child
from zion.supervisor.signals import SignalQueue

queue = SignalQueue()
queue.install()  # the master's handlers, as zion serve has them
forked_r, forked_w = os.pipe()
pid = fork_child(ignore=[signal.SIGUSR1])
if pid == 0:  # as a worker or a helper would run: no handler of its own
    os.write(forked_w, b"x")
    time.sleep(30)
    os._exit(0)
print("master mask:", sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                             if s in MASTER_SIGNALS), flush=True)
os.read(forked_r, 1)
for sig in [signal.SIGUSR1, signal.Signals[sys.argv[1]]]:
    os.kill(pid, sig)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("exit:", -os.WTERMSIG(status) if os.WIFSIGNALED(status) else status, flush=True)
        break
    time.sleep(0.01)
else:
    os.kill(pid, signal.SIGKILL)
    print("exit: lost", flush=True)
"""


def test_a_master_signal_to_a_forked_child_has_its_default_action():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        out = subprocess.run([sys.executable, "-c", _CHILD_GETS, sig.name], capture_output=True,
                             text=True, timeout=30, cwd=REPO).stdout
        assert "master mask: []" in out, out  # nothing left blocked in the master
        # SIGUSR1 ignored as asked; the master's signal ends the child, which
        # queued nothing in the master's queue (its copy of it)
        assert f"exit: {-sig}" in out, (sig, out)
