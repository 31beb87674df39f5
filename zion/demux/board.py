"""Per-worker status slots in shared memory, read by the eBPF demux.

One `Slot` per worker index. With the demux loaded the slots are the values
of a BPF_F_MMAPABLE array map (`zion_slots` in bpf/zion_demux.c), so workers
publish heartbeat and load with plain stores, no system call, and the
program reads them for every new connection. Without the demux they are an
anonymous shared mapping, so /_zion/status shows the same facts either way.
The mapping is made in the master before fork; MAP_SHARED survives fork.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import time
from enum import IntEnum
from typing import Any


class SlotState(IntEnum):
    """Slot.state; the same numbers are #defined in bpf/zion_demux.c."""

    EMPTY = 0
    STARTING = 1
    READY = 2
    DRAINING = 3


STATE_NAMES = {s: s.name.lower() for s in SlotState}

# The heartbeat's contract. A worker with work in hand (requests in flight,
# TLS handshakes) beats every interval, one without (idle, or holding only
# idle keep-alive connections) every IDLE_BEATS intervals (zion/worker.py);
# a worker with work and no beat for BUSY_BEATS intervals is taken to be
# blocked now (the program's ZION_BUSY_NS, the master's queue mover).
IDLE_BEATS = 4
BUSY_BEATS = 2


class Slot(ctypes.Structure):
    # Layout mirrors `struct zion_slot` in bpf/zion_demux.c: 56 bytes, no padding.
    _fields_ = [
        ("heartbeat_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
        ("dispatches", ctypes.c_uint64),    # incremented by the program
        ("accepted", ctypes.c_uint64),      # connections the worker took from the listener
        # dispatches that will never be accepted: the master's drift correction
        ("dropped", ctypes.c_uint64),
        ("state", ctypes.c_uint32),         # written by the master
        ("conns", ctypes.c_uint32),         # open connections (handshakes included): worker
        ("inflight", ctypes.c_uint32),      # requests being handled
        ("pid", ctypes.c_uint32),
        ("backlog", ctypes.c_uint32),       # accept queue, as the master last sampled it
        ("handshakes", ctypes.c_uint32),    # TLS handshakes in progress (in conns too): worker
    ]

    @property
    def active(self) -> bool:
        """Work in hand, as the program sees it: a request in flight, a TLS
        handshake, a connection sent and not accepted yet."""
        return bool(self.inflight or self.handshakes or self.pending)

    @property
    def pending(self) -> int:
        """Dispatched and not accepted yet, as the program computes it (u64
        arithmetic read as signed, floored at 0)."""
        return max(0, signed64(self.dispatches - self.accepted - self.dropped))


def signed64(value: int) -> int:
    """A difference of u64 counters as the program's (s64) cast reads it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


SLOT_SIZE = ctypes.sizeof(Slot)
assert SLOT_SIZE == 56
# A whole slot, in Slot's field order, for StatusBoard.read.
_SLOT_FIELDS = struct.Struct("=4Q6I")
assert _SLOT_FIELDS.size == SLOT_SIZE


def mapping_size(count: int) -> int:
    return max(mmap.PAGESIZE, -(-count * SLOT_SIZE // mmap.PAGESIZE) * mmap.PAGESIZE)


class StatusBoard:
    def __init__(self, mem: mmap.mmap, count: int, shared_with_bpf: bool) -> None:
        self._mem = mem
        self.count = count
        self.shared_with_bpf = shared_with_bpf
        # One slot per worker, then one whose `dispatches` the program bumps
        # when it found no healthy worker and left the choice to the kernel.
        self.slots = (Slot * (count + 1)).from_buffer(mem)

    @classmethod
    def anonymous(cls, count: int) -> StatusBoard:
        mem = mmap.mmap(-1, mapping_size(count + 1), mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(mem, count, shared_with_bpf=False)

    @classmethod
    def from_map_fd(cls, fd: int, count: int) -> StatusBoard:
        mem = mmap.mmap(fd, mapping_size(count + 1), mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(mem, count, shared_with_bpf=True)

    def read(self, index: int) -> tuple[int, ...]:
        """One slot's fields, each read once, in Slot's order: (heartbeat_ns,
        dispatches, accepted, dropped, state, conns, inflight, pid, backlog,
        handshakes). For the master's looks, many times a second: one call
        per slot, where each ctypes field read costs about half a thousand
        instructions. Each field is one aligned load, as a ctypes read is;
        the fields are not a snapshot taken at one instant, as they never
        were read one by one."""
        return _SLOT_FIELDS.unpack_from(self._mem, index * SLOT_SIZE)

    def set_state(self, index: int, state: SlotState, pid: int = 0) -> None:
        slot = self.slots[index]
        if state in (SlotState.STARTING, SlotState.EMPTY):
            slot.conns = 0
            slot.inflight = 0
            slot.handshakes = 0
        if pid or state is SlotState.EMPTY:
            slot.pid = pid
        slot.state = state

    def forget_pending(self, index: int) -> None:
        """The slot's listener was replaced: nothing sent to the old one is
        waiting on the new one."""
        slot = self.slots[index]
        slot.dropped = (slot.dispatches - slot.accepted) & ((1 << 64) - 1)

    @property
    def fallbacks(self) -> int:
        return int(self.slots[self.count].dispatches)

    def snapshot(self, stall_threshold_ms: int) -> list[dict[str, Any]]:
        now = time.monotonic_ns()
        out = []
        for index in range(self.count):
            slot = self.slots[index]
            age_ms = (now - slot.heartbeat_ns) / 1e6 if slot.heartbeat_ns else None
            state = STATE_NAMES.get(slot.state, str(slot.state))  # type: ignore[call-overload]
            if state == "ready" and (age_ms is None or age_ms > stall_threshold_ms):
                state = "stalled"
            out.append({
                "worker": index,
                "pid": slot.pid,
                "state": state,
                "heartbeat_age_ms": None if age_ms is None else round(age_ms, 1),
                "connections": slot.conns,
                "backlog": slot.backlog,
                "pending": slot.pending,
                "inflight": slot.inflight,
                "dispatches": slot.dispatches,
            })
        return out
