"""What the demux tests ask of the kernel: can this process load eBPF, and
which zion programs exist or are held."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from zion import caps
from zion.demux.reasons import Unavailable

BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"

# A demux program the verifier rejects: it reads packet memory without a
# bounds check.
UNCHECKED_PACKET_READ = (
    "#include <uapi/linux/bpf.h>\n"
    "BPF_F_TABLE(\"array\", u32, u64, zion_slots, 257, BPF_F_MMAPABLE);\n"
    "int zion_demux(struct sk_reuseport_md *md) {\n"
    "    char *p = (char *)(long)md->data;\n"
    "    return p[40];\n"
    "}\n")


def cannot_load_bpf() -> str | None:
    """None when this process can load the demux; else the reason to skip."""
    have = caps.effective()
    if caps.CAP_BPF not in have and caps.CAP_SYS_ADMIN not in have:
        return "needs CAP_BPF or CAP_SYS_ADMIN (run as root)"
    try:
        from zion.demux.preflight import import_bcc
        import_bcc()
    except Unavailable as exc:
        return f"needs Debian's python3-bpfcc ({exc.detail})"
    return None


def bpftool_progs() -> list[dict]:
    out = subprocess.run([BPFTOOL, "-j", "prog", "list"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def zion_prog_ids() -> set[int]:
    return {p["id"] for p in bpftool_progs()
            if p.get("type") == "sk_reuseport" and p.get("name") == "zion_demux"}


def prog_fds(pid: int) -> int:
    """eBPF program descriptors process `pid` holds."""
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            if "prog_id:" in info.read_text():
                count += 1
        except OSError:
            pass
    return count
