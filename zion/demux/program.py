"""The program text bcc compiles, and its -D contract.

bpf/zion_demux.c is the source (its header comment states the contract);
the parameters are prepended as #defines, and `zion doctor --ebpf` prints
exactly this text.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# #define ZION_MODE values in bpf/zion_demux.c.
MODES = {"hash": 0, "least-loaded": 1, "cpu": 2}
# Sockarray and status-board capacity: the most workers a group can ever have.
MAX_WORKERS = 256


def source_path() -> Path:
    """The program source shipped inside the installed package."""
    return Path(str(resources.files("zion") / "_data" / "zion_demux.c"))


def program_text(source: str, workers: int, sockarray_fd: int, mode: str,
                 stall_ns: int, busy_ns: int, idle_ns: int, migrate: bool = False) -> str:
    return (
        f"/* parameters set by zion/demux/program.py */\n"
        f"#define ZION_WORKERS {workers}\n"
        f"#define ZION_SOCKARRAY_FD {sockarray_fd}\n"
        f"#define ZION_MODE {MODES[mode]} /* {mode} */\n"
        f"#define ZION_STALL_NS {stall_ns}ULL\n"
        f"#define ZION_BUSY_NS {busy_ns}ULL\n"
        f"#define ZION_IDLE_NS {idle_ns}ULL\n"
        f"#define ZION_MIGRATE {int(migrate)}\n"
        f"#line 1 \"zion_demux.c\"\n"
        f"{source}"
    )
