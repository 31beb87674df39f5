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
from dataclasses import dataclass
from enum import Enum

from zion.demux.board import SlotState, StatusBoard

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
# Past the limit a worker drains, which takes as long as its slowest request;
# past this multiple of it, it is killed at once (a leak that fast would
# take the host's memory before the drain ends).
HARD_FACTOR = 1.5


def rss_bytes(pid: int) -> int | None:
    """Resident set size from /proc/PID/statm (its second field, in pages);
    None when the process is gone. statm, not status: one short read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


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


@dataclass(frozen=True)
class MemoryVerdict:
    pid: int
    rss: int
    verdict: Memory


def look_soon(rss: int, previous: tuple[float, int] | None, now: float, limit_mib: int,
              near: float, interval: float) -> bool:
    """Whether a worker's next RSS look should come at the fast cadence: it
    is past `near` times the limit, or it is new (no growth rate known yet),
    or, growing as it grew since its `previous` look (when, RSS), it would
    pass that mark within two regular `interval`s (one for a late look). A
    fast leak (4 MiB per request at a few hundred requests a second) grows
    past the limit and the hard ceiling between two looks a quarter of a
    second apart: it would be killed with requests in flight instead of
    replaced."""
    mark = near * limit_mib * MIB
    if rss > mark or previous is None:
        return True
    then, before = previous
    rate = max(0, rss - before) / max(now - then, 1e-3)
    return rss + rate * 2 * interval > mark


def memory_verdict(pid: int, limit_mib: int) -> MemoryVerdict | None:
    """None when the process is gone."""
    rss = rss_bytes(pid)
    if rss is None:
        return None
    limit = limit_mib * MIB
    if rss > limit * HARD_FACTOR:
        verdict = Memory.CEILING
    elif rss > limit:
        verdict = Memory.OVER
    else:
        verdict = Memory.OK
    return MemoryVerdict(pid, rss, verdict)
