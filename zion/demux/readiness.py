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

from zion import caps
from zion.demux import policy, preflight
from zion.demux.program import MAX_WORKERS
from zion.demux.reasons import FallbackReason, Unavailable
from zion.demux.shim import ReuseportSockArray, ShimError, SkReuseport
from zion.settings import Settings


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



@dataclass(frozen=True)
class Report:
    state: DemuxReadiness
    detail: str
    errno: int | None = None
    reason: FallbackReason | None = None  # the finer code, e.g. verifier_rejected
    prog_id: int | None = None
    program_text: str | None = None

    @property
    def fix(self) -> str | None:
        return None if self.state is DemuxReadiness.READY else FIXES[self.state]


def _state_of(reason: FallbackReason) -> DemuxReadiness:
    """Reasons beyond the readiness states (verifier_rejected, ...) fold into
    probe_failed for doctor's headline; the finer reason is printed too."""
    try:
        return DemuxReadiness(str(reason))
    except ValueError:
        return DemuxReadiness.PROBE_FAILED


def probe(settings: Settings, workers: int = 2) -> Report:
    """Readiness: the preflight checks, then compile, load and attach the real
    program to a throwaway listener group. The program text is reported
    whatever stage failed after it was made (a verifier rejection included)."""
    if not settings.demux.enabled:
        return Report(DemuxReadiness.DISABLED, f"disabled by {settings.demux_disabled_by}")
    group = _throwaway_group(workers)
    sockarray: ReuseportSockArray | None = None
    prog: SkReuseport | None = None
    text: str | None = None
    try:
        kernel_source = preflight.check(settings)
        bcc = preflight.import_bcc()
        if not 1 <= workers <= MAX_WORKERS:
            raise Unavailable(FallbackReason.PROBE_FAILED,
                              f"the demux supports 1..{MAX_WORKERS} workers")
        from bcc.libbcc import lib

        sockarray = ReuseportSockArray.create(lib, MAX_WORKERS)
        fd = sockarray.fd
        text = policy.text_for(settings, workers, fd, False)  # reported if both loads fail
        prog, _ = SkReuseport.load_migrating(
            bcc, lambda m: policy.text_for(settings, workers, fd, m), kernel_source,
            settings.demux.migrate)
        text = prog.text
        for index, sock in enumerate(group):
            sockarray.set(index, sock)
        prog.attach(group[0])
        return Report(DemuxReadiness.READY, "trial load and attach succeeded",
                      prog_id=prog.prog_id, program_text=text)
    except Unavailable as exc:
        return Report(_state_of(exc.reason), exc.detail, exc.errno, exc.reason,
                      program_text=text)
    except ShimError as exc:
        reason = policy.classify(exc)
        return Report(_state_of(reason), policy.describe(exc), exc.errno, reason,
                      program_text=text)
    except OSError as exc:
        return Report(DemuxReadiness.PROBE_FAILED, str(exc), exc.errno,
                      FallbackReason.PROBE_FAILED, program_text=text)
    finally:
        if prog is not None:
            prog.close()
        if sockarray is not None:
            sockarray.close()
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
