"""The loop watchdog reports a blocked loop's stack once per episode."""

from __future__ import annotations

import _thread
import sys
import threading
import time
from dataclasses import dataclass

import structlog

from zion.watchdog import LoopWatchdog


@dataclass
class Slot:
    heartbeat_ns: int = 0


def test_one_report_per_blocked_episode_naming_the_blocked_function():
    slot = Slot(time.monotonic_ns())
    dog = LoopWatchdog(slot, threshold=0.1)
    with structlog.testing.capture_logs() as logs:
        assert not dog.check(slot.heartbeat_ns + 50_000_000)  # 50 ms: not blocked
        assert dog.check(slot.heartbeat_ns + 200_000_000)
        assert not dog.check(slot.heartbeat_ns + 400_000_000)  # same episode
        slot.heartbeat_ns += 500_000_000  # the loop turned, then blocked again
        assert dog.check(slot.heartbeat_ns + 200_000_000)
    assert [e["event"] for e in logs] == ["worker_blocked", "worker_blocked"]
    # Here the main thread is this test: its frame is the innermost.
    assert logs[0]["where"].startswith("check ") or "test_one_report" in logs[0]["stack"][-2]
    assert logs[0]["blocked_ms"] == 200.0


def test_a_stopped_watchdog_reports_nothing():
    slot = Slot(time.monotonic_ns())
    dog = LoopWatchdog(slot, threshold=0.1)
    dog.stop()
    assert not dog.check(slot.heartbeat_ns + 10**9)


def _check_from_another_thread(dog: LoopWatchdog, now_ns: int) -> bool:
    """dog.check(now_ns) run by another thread while the main thread waits
    in C (a lock's acquire: no Python frame above the caller's)."""
    found: list[bool] = []
    main, here = threading.get_ident(), _check_from_another_thread.__code__
    waiting = _thread.allocate_lock()
    waiting.acquire()

    def look() -> None:
        # Thread.start() waits in Python until this thread runs: look once
        # the main thread is back in this function.
        deadline = time.monotonic() + 10
        while sys._current_frames()[main].f_code is not here:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        found.append(dog.check(now_ns))
        waiting.release()

    threading.Thread(target=look).start()
    waiting.acquire()
    return found[0]


def test_a_late_beat_with_the_loop_in_its_own_code_is_not_a_block():
    """The main thread inside the loop runner alone (here the helper that
    waits in C stands for zion.worker.main) is a loop waiting in C; its beat is
    late because the host did not schedule it. No report, and a real block
    afterwards is still reported."""
    slot = Slot(time.monotonic_ns())
    dog = LoopWatchdog(slot, threshold=0.1, idle_code=_check_from_another_thread.__code__)
    with structlog.testing.capture_logs() as logs:
        assert not _check_from_another_thread(dog, slot.heartbeat_ns + 10**9)
        dog.idle_code = None  # now the same stack stands for code that blocks
        assert _check_from_another_thread(dog, slot.heartbeat_ns + 10**9)
    assert [e["event"] for e in logs] == ["worker_blocked"]
    assert logs[0]["where"].startswith("_check_from_another_thread ")
