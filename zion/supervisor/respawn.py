"""When a dead worker comes back, and when to stop trying: a pure policy.

Per slot it counts deaths before the worker became ready. A worker that
says it can never start (ExitCode.WORKER_BOOT), or that dies
crash_loop_limit times in a row before becoming ready, is a give-up: the
master stops with one error line instead of respawning forever. Otherwise the
slot is respawned after respawn_backoff, doubling per consecutive failure up
to respawn_backoff_max. No processes, no clock: the caller passes `now`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from zion.errors import ExitCode
from zion.settings import SupervisorSettings


@dataclass(frozen=True)
class Respawn:
    index: int
    at: float
    delay: float


@dataclass(frozen=True)
class GiveUp:
    index: int
    reason: str


class RespawnPolicy:
    def __init__(self, settings: SupervisorSettings, count: int) -> None:
        self.settings = settings
        self.failures = [0] * count  # deaths in a row before becoming ready
        self.due: dict[int, float] = {}  # slot -> respawn time

    def resize(self, count: int) -> None:
        self.failures = [0] * count
        self.due.clear()

    def on_ready(self, index: int) -> None:
        self.failures[index] = 0

    def on_death(self, index: int, was_ready: bool, exit_code: int, now: float
                 ) -> Respawn | GiveUp:
        how = describe(exit_code)
        if was_ready and exit_code == ExitCode.RECYCLED:
            self.due[index] = now  # it retired on purpose: replace it at once
            return Respawn(index, now, 0.0)
        if not was_ready:
            self.failures[index] += 1
            if exit_code == ExitCode.WORKER_BOOT:
                return GiveUp(index, f"worker {index} cannot start (see its worker_boot_failed "
                              "line); not respawning")
            if self.failures[index] >= self.settings.crash_loop_limit:
                return GiveUp(index, f"worker {index} died {self.failures[index]} times in a "
                              f"row before becoming ready (last: {how})")
        failures = self.failures[index]
        s = self.settings
        delay = (min(s.respawn_backoff * 2 ** (failures - 1), s.respawn_backoff_max)
                 if failures else s.respawn_backoff)
        self.due[index] = now + delay
        return Respawn(index, now + delay, delay)

    def take_due(self, now: float) -> list[int]:
        """Slots whose respawn time has come; each is returned once."""
        ready = sorted(i for i, at in self.due.items() if at <= now)
        for index in ready:
            del self.due[index]
        return ready

    def next_due(self) -> float | None:
        return min(self.due.values(), default=None)


def describe(exit_code: int) -> str:
    """os.waitstatus_to_exitcode's value as people read it."""
    if exit_code < 0:
        return f"signal {signal.Signals(-exit_code).name}"
    return f"exit {exit_code}"
