"""A consistent-enough picture of one host, read when an admin client asks:
the workers' status slots, their counters, the listeners' accept queues and
what the master knows (phase, generation, demux, respawns, reloads).

Read from shared memory with plain loads while the workers keep writing, so
two fields may be a few microseconds apart; every value is a real one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zion.admin.health import Phase, WorkerHealth, WorkerState, readiness, shedding, weight_percent
from zion.counters import CounterBoard, SupervisorCounters
from zion.demux.board import SlotState, StatusBoard
from zion.listeners import accept_queue_len

_STATES = {SlotState.EMPTY: WorkerState.EMPTY, SlotState.STARTING: WorkerState.STARTING,
           SlotState.READY: WorkerState.READY, SlotState.DRAINING: WorkerState.DRAINING}


def read_workers(board: StatusBoard, sockets: Sequence[socket.socket],
                 stall_threshold_ms: int, now_ns: int | None = None) -> list[WorkerHealth]:
    now = time.monotonic_ns() if now_ns is None else now_ns
    out = []
    for index in range(board.count):
        slot = board.slots[index]
        beat = int(slot.heartbeat_ns)
        age_ms = (now - beat) / 1e6 if beat else None
        try:
            state = _STATES[SlotState(int(slot.state))]
        except ValueError:
            state = WorkerState.EMPTY
        if state is WorkerState.READY and (age_ms is None or age_ms > stall_threshold_ms):
            state = WorkerState.STALLED
        try:
            # The kernel's own count, not the demux's estimate in the slot.
            queue = accept_queue_len(sockets[index]) if index < len(sockets) else 0
        except OSError:
            queue = 0
        out.append(WorkerHealth(index, int(slot.pid), state,
                                None if age_ms is None else max(0.0, age_ms),
                                int(slot.conns), int(slot.inflight), queue))
    return out


@dataclass(frozen=True)
class HostView:
    phase: Phase
    generation: int
    workers: list[WorkerHealth]
    counters: list[dict[str, int]]  # per worker slot, as CounterBoard.totals
    dispatches: list[int] | None  # per worker slot; None when no program routes
    fallbacks: int | None  # connections the program left to the kernel's hash
    demux: dict[str, Any]  # DemuxOutcome.info()
    respawns: dict[int, int]
    stalls: dict[int, int]
    requeued: dict[int, int]
    reloads: int
    reload_failures: int
    max_connections: int
    concurrency: int = 0  # --limit-concurrency (0 = off)
    stuck: dict[int, int] = field(default_factory=dict)  # killed as stuck, per slot
    memory: dict[int, int] = field(default_factory=dict)  # replaced for RSS, per slot

    @property
    def ready(self) -> tuple[bool, str]:
        return readiness(self.phase, self.workers, self.concurrency)

    @property
    def weight(self) -> int:
        return weight_percent(self.workers, self.max_connections, self.concurrency)


def host_view(phase: Phase, generation: int, board: StatusBoard,
              workers: list[WorkerHealth], counters: CounterBoard,
              supervisor: SupervisorCounters, demux: dict[str, Any], routing: bool,
              max_connections: int, concurrency: int = 0) -> HostView:
    """`workers` is read_workers() of the same board."""
    return HostView(
        phase=phase, generation=generation, workers=workers,
        counters=[counters.totals(w.index) for w in workers],
        dispatches=[int(board.slots[w.index].dispatches) for w in workers] if routing else None,
        fallbacks=board.fallbacks if routing else None,
        demux=demux, respawns=dict(supervisor.respawns), stalls=dict(supervisor.stalls),
        requeued=dict(supervisor.requeued),
        reloads=supervisor.reloads, reload_failures=supervisor.reload_failures,
        max_connections=max_connections, concurrency=concurrency,
        stuck=dict(supervisor.stuck), memory=dict(supervisor.memory))


def status_document(view: HostView) -> dict[str, Any]:
    """GET /status: the whole host, every worker."""
    ready, why = view.ready
    workers = []
    for w, counts in zip(view.workers, view.counters, strict=True):
        workers.append({
            "worker": w.index, "pid": w.pid, "state": str(w.state),
            "heartbeat_age_ms": None if w.heartbeat_age_ms is None
            else round(w.heartbeat_age_ms, 1),
            "connections": w.connections, "inflight": w.inflight,
            "accept_queue": w.accept_queue,
            "dispatches": view.dispatches[w.index] if view.dispatches is not None else None,
            "respawns": view.respawns.get(w.index, 0), "stalls": view.stalls.get(w.index, 0),
            "requeued": view.requeued.get(w.index, 0),
            "shedding": shedding(w, view.concurrency),
            "stuck_kills": view.stuck.get(w.index, 0),
            "memory_replacements": view.memory.get(w.index, 0),
            **counts,
        })
    return {
        "phase": view.phase.value, "ready": ready, "reason": why,
        "generation": view.generation, "weight_percent": view.weight,
        "reloads": view.reloads, "reload_failures": view.reload_failures,
        "demux": {**view.demux, "fallbacks": view.fallbacks},
        "workers": workers,
    }
