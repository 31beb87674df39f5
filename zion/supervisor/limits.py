"""What the master enforces on each running worker: a loop blocked too long
(--timeout-worker-stuck) and resident memory past the limit
(--limit-worker-memory). It reads the status board and /proc, and decides;
the master acts (zion/supervisor/master.py).

A worker is stuck when its heartbeat is older than the timeout: a loop that
turns beats every few milliseconds even when idle (zion/demux/board.py,
IDLE_BEATS), so however busy a worker is, its heartbeat stays fresh and it is
never judged stuck. Only a loop that does not turn (a synchronous call that
does not return) is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from enum import Enum

from zion.demux.board import SlotState, StatusBoard

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
# Past the limit a worker drains, which takes as long as its slowest request;
# past this multiple of it, it is killed at once (a leak that fast would
# take the host's memory before the drain ends).
HARD_FACTOR = 1.5


def stuck_slots(board: StatusBoard, indexes: Iterable[int], now_ns: int,
                timeout_s: float) -> list[tuple[int, float]]:
    """(slot, seconds blocked) of each READY slot whose heartbeat is older
    than the timeout."""
    out = []
    limit_ns = timeout_s * 1e9
    for index in indexes:
        slot = board.slots[index]
        if slot.state != SlotState.READY or not slot.heartbeat_ns:
            continue
        age_ns = now_ns - slot.heartbeat_ns
        if age_ns > limit_ns:
            out.append((index, age_ns / 1e9))
    return out


class Memory(Enum):
    OK = "ok"
    OVER = "over"  # past the limit: replace it, let it drain
    CEILING = "ceiling"  # past HARD_FACTOR times the limit: kill it now


def memory_verdict(rss: int, limit_mib: int) -> Memory:
    limit = limit_mib * MIB
    if rss > limit * HARD_FACTOR:
        return Memory.CEILING
    if rss > limit:
        return Memory.OVER
    return Memory.OK


class RssReader:
    """Each worker's RSS from /proc/PID/statm through a descriptor kept open:
    one pread (about 4 µs here, against 50 µs to open, read and close), so the
    master can look fifty times a second. The descriptor names the process,
    not its number: once it has exited, reads fail (ESRCH) rather than read a
    process that reused the PID."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def rss(self, pid: int) -> int | None:
        """None when the process is gone."""
        fd = self.fds.get(pid)
        try:
            if fd is None:
                fd = self.fds[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            self.forget(pid)
            return None

    def forget(self, pid: int) -> None:
        fd = self.fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def keep_only(self, pids: Iterable[int]) -> None:
        for pid in set(self.fds).difference(pids):
            self.forget(pid)
