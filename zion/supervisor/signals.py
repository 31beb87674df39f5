"""Signal handlers only enqueue; the master's loop dispatches.

The wake-up pipe lets select() return as soon as a signal (or the --reload
watcher) has something for the loop, with no polling interval.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from typing import Any

from zion.forking import MASTER_SIGNALS

HANDLED = MASTER_SIGNALS  # zion/forking.py undoes them in every child the master forks


class SignalQueue:
    def __init__(self) -> None:
        self.pending: collections.deque[signal.Signals] = collections.deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, _frame: Any) -> None:
        self.pending.append(signal.Signals(signum))

    def push(self, sig: signal.Signals) -> None:
        """Inject a signal as if the kernel had delivered it (tests, reloader)."""
        self.pending.append(sig)
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop is awake anyway
            os.write(self.wake_w, b"w")

    def pop(self) -> signal.Signals | None:
        return self.pending.popleft() if self.pending else None

    def drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass

    @property
    def fds(self) -> tuple[int, int]:
        return self.wake_r, self.wake_w
