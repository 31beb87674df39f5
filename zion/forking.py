"""Forking a child of the master that must not run the master's signal handlers.

The master's handlers (zion/supervisor/signals.py) only queue a signal in the
master's queue and write its wake-up pipe, and a fork copies both into the
child. A signal the child gets before it has put the default actions back (a
SIGTERM right after the fork: a stop just as a worker or a compile helper
starts) would run that copy of the handler: queued where nothing reads it, so
lost, and the child goes on. So the master's signals are blocked across the
fork and unblocked in the child only once its handlers are the defaults; one
that arrived in between is delivered then, with its default action.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

from zion.errors import ExitCode

# What the master handles (the only signals it installs handlers for).
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def fork_child(ignore: Iterable[signal.Signals] = ()) -> int:
    """os.fork() from the master: 0 in the child, whose handlers for
    MASTER_SIGNALS are the defaults (SIG_IGN for those in `ignore`) and which
    writes no wake-up fd; the child's pid in the master, whose signal mask is
    as it was."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for sig in MASTER_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for sig in ignore:
                signal.signal(sig, signal.SIG_IGN)
        except BaseException:
            os._exit(ExitCode.FAILURE)  # never on into the master's code
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid
