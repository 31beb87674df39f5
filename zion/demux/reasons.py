"""What state the demux is in and why it is not routing: the values of the
boot line (`bpf_demux=fallback reason=...`), /_zion/status and `zion
doctor`. A leaf module, so preflight, headers and policy can all use them."""

from __future__ import annotations

from enum import StrEnum


class DemuxState(StrEnum):
    ATTACHED = "attached"  # the program routes every new connection
    PREPARED = "prepared"  # loaded for a reload, swapped in when its workers are ready
    FALLBACK = "fallback"  # the kernel's reuseport hash routes
    DISABLED = "disabled"  # --no-bpf-demux / [demux] enabled = false


class FallbackReason(StrEnum):
    FLAG = "flag"  # disabled on purpose
    KERNEL_UNSUPPORTED = "kernel_unsupported"
    NO_CAPABILITY = "no_capability"
    # CAP_BPF effective, and the first bpf() call answered EPERM all the same:
    # a seccomp filter (Podman's default profile) or an LSM refuses the call
    BPF_SYSCALL_REFUSED = "bpf_syscall_refused"
    NO_BCC = "no_bcc"
    NO_KERNEL_HEADERS = "no_kernel_headers"
    COMPILE_FAILED = "compile_failed"
    VERIFIER_REJECTED = "verifier_rejected"
    ATTACH_FAILED = "attach_failed"
    PROBE_FAILED = "probe_failed"


class Unavailable(Exception):
    """The demux cannot be used here; boot goes on with the kernel hash."""

    def __init__(self, reason: FallbackReason, detail: str, errno: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.errno = errno
