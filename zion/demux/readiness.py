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
from pathlib import Path

from zion import caps
from zion.demux import policy, preflight, shim
from zion.demux.program import MAX_WORKERS, program_text
from zion.demux.reasons import FallbackReason, Unavailable
from zion.demux.shim import ShimError
from zion.listeners import ListenerGroup
from zion.settings import Settings

_BPF_MAP_TYPE_ARRAY = 2


class DemuxReadiness(StrEnum):
    READY = "ready"
    DISABLED = "disabled"
    NO_CAPABILITY = "no_capability"
    # CAP_BPF (and CAP_SYS_ADMIN) absent from the bounding set: nothing this
    # process runs can ever have it (nspawn's default, a unit's
    # CapabilityBoundingSet, a container runtime's default set)
    NOT_IN_BOUNDING_SET = "cap_bpf_not_in_bounding_set"
    # CAP_BPF effective only in a user namespace (rootless Podman, userns-remap):
    # bpf() asks for it in the initial namespace, so nothing inside can load
    USER_NAMESPACE = "cap_bpf_in_user_namespace"
    # CAP_BPF effective, and bpf() still refused: a seccomp filter (nspawn's,
    # Podman's and Kubernetes' RuntimeDefault profiles) or an LSM
    BPF_REFUSED = "bpf_syscall_refused"
    NO_BCC = "no_bcc"
    NO_KERNEL_HEADERS = "no_kernel_headers"
    KERNEL_UNSUPPORTED = "kernel_unsupported"
    PROBE_FAILED = "probe_failed"


_ENVIRONMENTS = (
    "  systemd:        AmbientCapabilities=CAP_BPF CAP_NET_BIND_SERVICE, the same in "
    "CapabilityBoundingSet=, SystemCallFilter=@system-service bpf (config/zion.service)\n"
    "  systemd-nspawn: --capability=CAP_BPF,CAP_PERFMON --system-call-filter=bpf\n"
    "  Podman:         --cap-add BPF --security-opt seccomp=<its profile with bpf allowed: "
    "scripts/seccomp_allow_bpf.py> (rootful; docs/deployment.md)\n"
    "  Docker:         --cap-add BPF (its default profile allows bpf with CAP_BPF; older "
    "ones need the profile as for Podman)\n"
    "  Kubernetes:     securityContext: {capabilities: {add: [BPF]}, "
    "seccompProfile: {type: Localhost, localhostProfile: <profile allowing bpf>}}")

FIXES = {
    DemuxReadiness.DISABLED: "remove --no-bpf-demux, or set [demux] enabled = true",
    DemuxReadiness.NO_CAPABILITY: (
        "CAP_BPF is in the bounding set but not effective: run the master as root, or give "
        "it CAP_BPF (systemd: AmbientCapabilities=CAP_BPF CAP_NET_BIND_SERVICE, as in "
        "config/zion.service; setpriv --ambient-caps +bpf); workers never need it"),
    DemuxReadiness.NOT_IN_BOUNDING_SET: (
        "CAP_BPF is missing from the bounding set, so no process here can get it; whoever "
        "starts zion must grant it:\n" + _ENVIRONMENTS),
    DemuxReadiness.USER_NAMESPACE: (
        "zion runs in a user namespace, and bpf() counts only CAP_BPF held in the host's "
        "initial one: no capability or seccomp profile given to this container can help. "
        "Run it without a user namespace (rootful podman or Docker, no --userns / "
        "userns-remap), with CAP_BPF and bpf allowed:\n" + _ENVIRONMENTS),
    DemuxReadiness.BPF_REFUSED: (
        "CAP_BPF is effective but bpf() is refused: allow the bpf system call in the "
        "seccomp filter (or the LSM policy):\n" + _ENVIRONMENTS),
    DemuxReadiness.NO_BCC: (
        "no compiled object is kept and bcc is missing to compile one: apt-get install "
        "python3-bpfcc (PyPI's 'bcc' is an unrelated package) and run scripts/setup.sh, or "
        "ship the objects scripts/setup.sh writes (zion/_data/objects)"),
    DemuxReadiness.NO_KERNEL_HEADERS: (
        "no compiled object is kept and there are no headers to compile one: run "
        "scripts/setup.sh where headers exist (it compiles into zion/_data/objects, which "
        "serves any kernel), or apt-get install linux-headers-$(uname -r) (or "
        "linux-headers-amd64), or set [demux] kernel_headers"),
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
    origin: str | None = None  # which object was loaded: kept, or compiled now

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


def capability_sets() -> dict[str, set[int]]:
    """CapBnd, CapPrm, CapEff, CapAmb from /proc/self/status (capget(2) has
    no bounding set)."""
    sets: dict[str, set[int]] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapBnd", "CapPrm", "CapEff", "CapAmb"):
            mask = int(value.strip(), 16)
            sets[key] = {bit for bit in range(64) if mask >> bit & 1}
    return sets


def seccomp_mode() -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return {"0": "none", "1": "strict", "2": "filter"}.get(line.split()[1], "?")
    return "?"


def diagnose_bpf() -> Report | None:
    """Can this process use bpf() at all? None when it can; else which of:
    CAP_BPF outside the bounding set, held only in a user namespace, not
    effective, or refused (seccomp or an LSM) while effective. A tiny array
    map is the cheapest real call."""
    sets = capability_sets()
    wanted = {caps.CAP_BPF, caps.CAP_SYS_ADMIN}
    if not wanted & sets.get("CapBnd", set()):
        return Report(DemuxReadiness.NOT_IN_BOUNDING_SET,
                      "neither cap_bpf nor cap_sys_admin is in the bounding set (CapBnd)",
                      errno_mod.EPERM, FallbackReason.NO_CAPABILITY)
    namespace = caps.user_namespace()
    if namespace is not None:
        return Report(DemuxReadiness.USER_NAMESPACE,
                      f"this process is in a user namespace (uid_map {namespace}): its "
                      f"capabilities do not count for bpf()", errno_mod.EPERM,
                      FallbackReason.NO_CAPABILITY)
    if not wanted & sets.get("CapEff", set()):
        return Report(DemuxReadiness.NO_CAPABILITY,
                      "cap_bpf is in the bounding set but neither it nor cap_sys_admin is "
                      "effective", errno_mod.EPERM, FallbackReason.NO_CAPABILITY)
    try:
        os.close(shim.map_create(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, name="zion_probe"))
    except ShimError as exc:
        if exc.errno == errno_mod.EPERM:
            return Report(DemuxReadiness.BPF_REFUSED,
                          f"bpf(BPF_MAP_CREATE) of a 1-entry array: EPERM with cap_bpf "
                          f"effective (seccomp: {seccomp_mode()}; else an LSM)",
                          exc.errno, FallbackReason.BPF_SYSCALL_REFUSED)
        if exc.errno == errno_mod.ENOSYS:
            return Report(DemuxReadiness.KERNEL_UNSUPPORTED, "bpf(): ENOSYS (a kernel without "
                          "CONFIG_BPF_SYSCALL, or a seccomp filter answering ENOSYS)",
                          exc.errno, FallbackReason.KERNEL_UNSUPPORTED)
    return None


def probe(settings: Settings, workers: int = 2) -> Report:
    """Readiness: the preflight checks, whether bpf() is allowed at all, then
    load (compiling if no object is kept) and attach the real program to a
    throwaway listener group. The program text is reported whatever stage
    failed after it was made (a verifier rejection included)."""
    if not settings.demux.enabled:
        return Report(DemuxReadiness.DISABLED, f"disabled by {settings.demux_disabled_by}")
    if not 1 <= workers <= MAX_WORKERS:
        return Report(DemuxReadiness.PROBE_FAILED,
                      f"the demux supports 1..{MAX_WORKERS} workers")
    refused = diagnose_bpf()
    if refused is not None:
        return refused
    group = _throwaway_group(workers)
    program: policy.Program | None = None
    text: str | None = None
    try:
        preflight.check(settings)
        source, _custom = policy.read_source(settings)
        text = program_text(source, 0, settings.demux.mode, False)
        program = policy.load(settings, group)
        program.attach(group.sockets[0])
        return Report(DemuxReadiness.READY, "trial load and attach succeeded",
                      prog_id=program.prog_id, program_text=program.text,
                      origin=program.origin)
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
        if program is not None:
            program.close()
        group.close()


def _throwaway_group(count: int) -> ListenerGroup:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        port = sock.getsockname()[1]
        socks.append(sock)
    return ListenerGroup(tuple(socks), "127.0.0.1", port, socket.AF_INET)


def describe_caps() -> str:
    sets = capability_sets()

    def state(cap: int) -> str:
        if cap in sets.get("CapEff", set()):
            return "effective"
        return "bounding-only" if cap in sets.get("CapBnd", set()) else "no"

    wanted = [caps.CAP_BPF, caps.CAP_PERFMON, caps.CAP_SYS_ADMIN, caps.CAP_NET_BIND_SERVICE]
    return ", ".join(f"{caps.name(c)}={state(c)}" for c in wanted) + \
        f"; seccomp={seccomp_mode()}"


def describe_errno(err: int | None) -> str:
    return "" if err is None else f"{errno_mod.errorcode.get(err, err)} ({os.strerror(err)})"
