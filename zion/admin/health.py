"""One host's health and load, from its workers' status slots: whether it
is ready (Kubernetes), the line HAProxy's agent-check reads, and which
workers just stalled. Pure functions over `WorkerHealth` values.

A worker is healthy as the demux program judges it (bpf/zion_demux.c,
zion_healthy): its slot is READY and its heartbeat is no older than the
stall threshold. Its load is made of the same fields the program compares:
open connections, requests in flight and the listener's accept queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum

from zion.http.admission import at_limit


class WorkerState(StrEnum):
    EMPTY = "empty"  # no process on the slot (died, waiting for its respawn)
    STARTING = "starting"
    READY = "ready"
    STALLED = "stalled"  # READY, but its heartbeat is older than the stall threshold
    DRAINING = "draining"


class Phase(Enum):
    """What the master is doing."""

    STARTING = "starting"  # the first generation is not fully up yet
    SERVING = "serving"
    RELOADING = "reloading"  # a new generation is starting next to the running one
    STOPPING = "stopping"


@dataclass(frozen=True)
class WorkerHealth:
    index: int
    pid: int
    state: WorkerState
    heartbeat_age_ms: float | None
    connections: int
    inflight: int
    accept_queue: int


# Requests in flight plus connections waiting in the accept queue at which a
# worker counts as half free: a worker busy with one slow request still takes
# more (asyncio interleaves them), one with a queue it does not drain does not.
QUEUE_KNEE = 8


def shedding(worker: WorkerHealth, concurrency: int) -> bool:
    """At --limit-concurrency: a new connection's request would get 503."""
    return at_limit(concurrency, worker.connections, worker.inflight)


def capacity(worker: WorkerHealth, max_connections: int, concurrency: int = 0) -> float:
    """What share of a full worker's traffic this one can take now, 0..1."""
    if worker.state is not WorkerState.READY or shedding(worker, concurrency):
        return 0.0
    room = max(0.0, 1.0 - worker.connections / max_connections)
    if concurrency:
        used = max(worker.connections, worker.inflight) / concurrency
        room = min(room, max(0.0, 1.0 - used))
    busy = worker.inflight + worker.accept_queue
    return room * QUEUE_KNEE / (QUEUE_KNEE + busy)


def weight_percent(workers: Sequence[WorkerHealth], max_connections: int,
                   concurrency: int = 0) -> int:
    """The host's agent-check weight: 100 when every worker is healthy and
    idle, falling with each stalled, dead or draining worker and with load;
    at least 1 while any worker is healthy (HAProxy sends nothing at 0%)."""
    if not workers:
        return 0
    share = sum(capacity(w, max_connections, concurrency) for w in workers) / len(workers)
    if not any(w.state is WorkerState.READY for w in workers):
        return 0
    return max(1, min(100, round(100 * share)))


def healthy(workers: Sequence[WorkerHealth]) -> int:
    return sum(1 for w in workers if w.state is WorkerState.READY)


def agent_line(phase: Phase, workers: Sequence[WorkerHealth], max_connections: int,
               concurrency: int = 0) -> str:
    """The one line for HAProxy's agent-check (configuration.txt, 5.2
    "agent-check"): words separated by spaces; a reason starts at a "#" that
    follows a space ("down#x" would be one unknown word, ignored). The weight
    is a bare "N%": HAProxy 2.6 (Debian 12) ignores "weight:N%" and keeps the
    old weight (tests/admin/test_haproxy.py checks the weight HAProxy shows)."""
    if phase in (Phase.STOPPING, Phase.RELOADING):
        return "drain\n"
    if not healthy(workers):
        return "down #no healthy worker\n"
    # Every worker shedding: the least weight HAProxy still sends to (1%).
    return f"up ready {weight_percent(workers, max_connections, concurrency)}%\n"


def readiness(phase: Phase, workers: Sequence[WorkerHealth],
              concurrency: int = 0) -> tuple[bool, str]:
    """Whether a readiness probe should send traffic here, and why (not)."""
    if phase is Phase.STOPPING:
        return False, "stopping"
    if phase is Phase.STARTING:
        return False, "starting"
    if not healthy(workers):
        return False, "no healthy worker"
    if all(shedding(w, concurrency) for w in workers if w.state is WorkerState.READY):
        return False, "overloaded: every worker is at the concurrency limit"
    return True, "serving"


class StallWatch:
    """Counts each worker that goes from not stalled to stalled once."""

    def __init__(self) -> None:
        self._stalled: set[int] = set()

    def observe(self, workers: Sequence[WorkerHealth]) -> list[int]:
        """The slots that became stalled since the last call."""
        now = {w.index for w in workers if w.state is WorkerState.STALLED}
        new = sorted(now - self._stalled)
        self._stalled = now
        return new
