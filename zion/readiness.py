"""Can this process load the demux? Decided by real checks, not the uid.

The states are the `reason` codes of the boot line and of `zion doctor`:
capabilities come from capget(2), bcc from an import, headers from the
filesystem, and `doctor` adds a trial load + attach against a throwaway
listener group, which is the only check the verifier can answer.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
from dataclasses import dataclass
from enum import StrEnum

from zion import bpf_demux, caps
from zion.config import Settings
from zion.errors import DemuxError


class DemuxReadiness(StrEnum):
    READY = "ready"
    DISABLED = "disabled"
    NO_CAPABILITY = "no_capability"
    NO_BCC = "no_bcc"
    NO_KERNEL_HEADERS = "no_kernel_headers"
    KERNEL_UNSUPPORTED = "kernel_unsupported"
    PROBE_FAILED = "probe_failed"


FIXES = {
    DemuxReadiness.DISABLED: "remove --no-bpf-demux, or set [demux] enabled = true",
    DemuxReadiness.NO_CAPABILITY: (
        "run the master as root, or give it CAP_BPF (systemd: AmbientCapabilities=CAP_BPF "
        "CAP_NET_BIND_SERVICE, as in config/zion.service); workers never need it"),
    DemuxReadiness.NO_BCC: (
        "apt-get install python3-bpfcc (PyPI's 'bcc' is an unrelated package); "
        "scripts/setup.sh links Debian's bcc into .venv"),
    DemuxReadiness.NO_KERNEL_HEADERS: (
        "apt-get install linux-headers-$(uname -r), or linux-headers-amd64 when the running "
        "kernel has no package (any recent uapi headers work), or set [demux] kernel_headers"),
    DemuxReadiness.KERNEL_UNSUPPORTED: (
        "the demux needs Linux >= 5.5 with CONFIG_BPF_SYSCALL; zion serves on the kernel's "
        "reuseport hash meanwhile"),
    DemuxReadiness.PROBE_FAILED: "see the error above; `zion doctor --ebpf` prints the program",
}

# Fallback reasons beyond the readiness states, folded into one for doctor.
_AS_STATE = {"verifier_rejected": DemuxReadiness.PROBE_FAILED,
             "compile_failed": DemuxReadiness.PROBE_FAILED,
             "attach_failed": DemuxReadiness.PROBE_FAILED}


@dataclass(frozen=True)
class Report:
    state: DemuxReadiness
    detail: str
    errno: int | None = None
    reason: str | None = None  # the finer code, e.g. verifier_rejected
    prog_id: int | None = None
    program_text: str | None = None

    @property
    def fix(self) -> str | None:
        return None if self.state is DemuxReadiness.READY else FIXES[self.state]


def _state_of(reason: str) -> DemuxReadiness:
    try:
        return DemuxReadiness(reason)
    except ValueError:
        return _AS_STATE.get(reason, DemuxReadiness.PROBE_FAILED)


def probe(settings: Settings, workers: int = 2) -> Report:
    """Readiness: the preflight checks, then compile, load and attach the real
    program to a throwaway listener group."""
    if not settings.demux.enabled:
        return Report(DemuxReadiness.DISABLED, f"disabled by {settings.demux_disabled_by}")
    group = _throwaway_group(workers)
    shim = None
    try:
        shim = bpf_demux.load(settings, workers)
        shim.fill(group)
        shim.attach(group[0])
        return Report(DemuxReadiness.READY, "trial load and attach succeeded",
                      prog_id=shim.prog_id, program_text=shim.text)
    except DemuxError as exc:
        return Report(_state_of(exc.reason), exc.detail, exc.errno, exc.reason,
                      program_text=getattr(shim, "text", None))
    except OSError as exc:
        return Report(DemuxReadiness.PROBE_FAILED, str(exc), exc.errno, "probe_failed")
    finally:
        if shim is not None:
            shim.close()
        for sock in group:
            sock.close()


def _throwaway_group(count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        port = sock.getsockname()[1]
        socks.append(sock)
    return socks


def describe_caps() -> str:
    have = caps.effective()
    wanted = [caps.CAP_BPF, caps.CAP_SYS_ADMIN, caps.CAP_NET_BIND_SERVICE]
    return ", ".join(f"{caps.name(c)}={'yes' if c in have else 'no'}" for c in wanted)


def describe_errno(err: int | None) -> str:
    return "" if err is None else f"{errno_mod.errorcode.get(err, err)} ({os.strerror(err)})"
