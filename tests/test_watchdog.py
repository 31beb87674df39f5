"""The loop watchdog reports a blocked loop's stack once per episode."""

from __future__ import annotations

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
