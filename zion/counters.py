"""Per-worker counters in shared memory, for the admin listener's /metrics.

Apart from the status board on purpose: the board is the BPF map the demux
program reads (`struct zion_slot` in bpf/zion_demux.c), and nothing here is
a routing signal. This is one anonymous MAP_SHARED mapping the master makes
before its first fork and keeps for its whole life, so workers of every
generation write into it with plain stores (no system call, no lock) and the
master reads it when scraped.

Counters are per worker slot (the `worker` label) and never reset: a worker
that is replaced continues its slot's counts, as Prometheus expects of a
counter. Each slot has two banks, chosen by the generation's parity: during
a reload the old and the new worker of a slot run at once, and an increment
from Python is a load and a store, so two writers of one word could lose a
count. Consecutive generations never share a bank; readers add the two.

The master's own counts (respawns, reloads, stalls seen) are plain Python
objects in the master: only the master writes or reads them.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field

MAX_SLOTS = 1024  # settings: server.workers is at most 1024
_BANKS = 2


class WorkerCounters(ctypes.Structure):
    _fields_ = [
        ("requests", ctypes.c_uint64),       # responses completed (any status)
        ("responses_4xx", ctypes.c_uint64),
        ("responses_5xx", ctypes.c_uint64),
        ("tls_handshakes", ctypes.c_uint64),  # completed handshakes
        ("tls_resumed", ctypes.c_uint64),     # ... of which resumed a session
        ("connections", ctypes.c_uint64),     # connections accepted
        ("sendfile_bytes", ctypes.c_uint64),  # file bytes sent with sendfile(2)
    ]


FIELDS = tuple(f[0] for f in WorkerCounters._fields_)


class CounterBoard:
    """MAX_SLOTS x 2 banks of WorkerCounters in one shared mapping (112 KiB)."""

    def __init__(self) -> None:
        size = ctypes.sizeof(WorkerCounters) * MAX_SLOTS * _BANKS
        self._mem = mmap.mmap(-1, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._slots = (WorkerCounters * (MAX_SLOTS * _BANKS)).from_buffer(self._mem)

    def for_worker(self, index: int, generation: int) -> WorkerCounters:
        """The struct one worker increments."""
        return self._slots[index * _BANKS + generation % _BANKS]

    def totals(self, index: int) -> dict[str, int]:
        """One slot's counts, both banks added."""
        banks = [self._slots[index * _BANKS + b] for b in range(_BANKS)]
        return {name: sum(int(getattr(bank, name)) for bank in banks) for name in FIELDS}


@dataclass
class SupervisorCounters:
    """What the master counts about its own work."""

    respawns: dict[int, int] = field(default_factory=dict)  # worker slot -> respawns
    stalls: dict[int, int] = field(default_factory=dict)  # worker slot -> stalls seen
    # worker slot -> connections moved from its accept queue while it was blocked
    requeued: dict[int, int] = field(default_factory=dict)
    stuck: dict[int, int] = field(default_factory=dict)  # worker slot -> killed as stuck
    memory: dict[int, int] = field(default_factory=dict)  # worker slot -> replaced for its RSS
    reloads: int = 0  # committed
    reload_failures: int = 0  # aborted: a new worker died, or the new settings were refused

    def respawned(self, index: int) -> None:
        self.respawns[index] = self.respawns.get(index, 0) + 1

    def moved(self, index: int, connections: int) -> None:
        self.requeued[index] = self.requeued.get(index, 0) + connections
