"""A worker's loop watchdog: when the event loop stops turning, log the
Python stack it is stuck in, once, as one structured line.

A thread, because nothing on the loop runs while the loop is blocked. It
reads the heartbeat the loop publishes into the worker's status slot (the
one the demux reads, zion/worker.py `_Heartbeat`) and, once the beat is
older than the demux's stall threshold, takes the main thread's frame from
`sys._current_frames()`. That needs the GIL: a blocking call that releases
it (time.sleep, a socket read, a lock wait, requests, most drivers) or pure
Python code (the interpreter hands the GIL over every switch interval, 5 ms)
is seen; a C extension that holds the GIL for the whole call is not, until
it returns. faulthandler would see that one too, but it writes raw text to a
file descriptor, not a log line.

The master replaces a worker blocked for `stuck_timeout` (zion/supervisor/
limits.py); this only says where it is blocked, before that happens.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from types import CodeType
from typing import Any, Protocol

from zion import log

logger = log.get_logger("zion.worker")

# Frames in a report: the innermost ones are the app's, the outer ones are
# asyncio's and zion's own, and a deep recursion must not make a huge line.
_MAX_FRAMES = 40


class HeartbeatSlot(Protocol):
    heartbeat_ns: int


class LoopWatchdog:
    """`threshold`: seconds without a heartbeat that mean blocked; it looks
    twice per threshold. One report per blocked episode: a new heartbeat
    ends the episode."""

    def __init__(self, slot: HeartbeatSlot, threshold: float,
                 idle_code: CodeType | None = None) -> None:
        self.slot = slot
        # The code of the function that runs the loop (zion.worker.main): the
        # main thread with no Python frame inside it is in the loop's own C
        # code (epoll_wait, uvloop's transports), not in a callback.
        self.idle_code = idle_code
        self.threshold_ns = int(threshold * 1e9)
        self.period = threshold / 2
        self.main_id = threading.main_thread().ident
        self.stopped = threading.Event()
        self.reported_beat = -1
        self.thread = threading.Thread(target=self._run, name="zion-loop-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """The loop stops beating on purpose (a drain): nothing to report."""
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.period):
            self.check(time.monotonic_ns())

    def check(self, now_ns: int) -> bool:
        """Report the main thread's stack if the loop is blocked and this
        episode was not reported yet; True when it reported."""
        beat = self.slot.heartbeat_ns
        if not beat or beat == self.reported_beat or now_ns - beat <= self.threshold_ns:
            return False
        frame = sys._current_frames().get(self.main_id or 0)
        if frame is None or self.stopped.is_set():
            return False
        if frame.f_code is self.idle_code:
            # Not blocked in Python: the beat is late because the process was
            # not scheduled (a loaded host runs its timers late), which no
            # stack can explain. A block that follows is still reported.
            return False
        self.reported_beat = beat
        logger.warning("worker_blocked", blocked_ms=round((now_ns - beat) / 1e6, 1),
                       **describe_stack(frame))
        return True


def describe_stack(frame: Any) -> dict[str, Any]:
    """`where`: the innermost frame (the function that made the blocking
    call); `stack`: outermost first, as a traceback prints it, one string
    per frame."""
    summary = traceback.extract_stack(frame)[-_MAX_FRAMES:]
    lines = [f"{f.filename}:{f.lineno} in {f.name}" + (f": {f.line}" if f.line else "")
             for f in summary]
    inner = summary[-1]
    return {"where": f"{inner.name} ({inner.filename}:{inner.lineno})", "stack": lines}
