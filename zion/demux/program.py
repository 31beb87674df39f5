"""The program text bcc compiles, its -D contract and its run-time config.

bpf/zion_demux.c is the source (its header comment states the contract).
Only what selects a variant is compiled in (the mode, whether it migrates,
and the sockarray's descriptor number, which the loader rewrites): they are
prepended as #defines, and `zion doctor --ebpf` prints exactly this text.
Whatever a configuration sets (workers, stall threshold, heartbeat pace) goes
into the zion_config map at load, so one compiled object serves every
configuration (zion/demux/objects.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# #define ZION_MODE values in bpf/zion_demux.c.
MODES = {"hash": 0, "least-loaded": 1, "cpu": 2}
# Sockarray and status-board capacity: the most workers a group can ever have
# (ZION_MAX_WORKERS in the program).
MAX_WORKERS = 256


def source_path() -> Path:
    """The program source shipped inside the installed package."""
    return Path(str(resources.files("zion") / "_data" / "zion_demux.c"))


def program_text(source: str, sockarray_fd: int, mode: str, migrate: bool = False) -> str:
    return (
        f"/* parameters set by zion/demux/program.py */\n"
        f"#define ZION_SOCKARRAY_FD {sockarray_fd}\n"
        f"#define ZION_MODE {MODES[mode]} /* {mode} */\n"
        f"#define ZION_MIGRATE {int(migrate)}\n"
        f"#line 1 \"zion_demux.c\"\n"
        f"{source}"
    )


@dataclass(frozen=True)
class ProgramConfig:
    """struct zion_config in bpf/zion_demux.c: u32 workers, u32 pad, u64
    stall_ns, busy_ns, idle_ns (no padding beyond `pad`)."""

    workers: int
    stall_ns: int
    busy_ns: int
    idle_ns: int

    FORMAT = "<IIQQQ"

    def pack(self) -> bytes:
        return struct.pack(self.FORMAT, self.workers, 0, self.stall_ns, self.busy_ns,
                           self.idle_ns)
