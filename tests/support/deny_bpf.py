"""Run a command under a real seccomp filter that answers bpf(2) with EPERM,
as systemd-nspawn's and the container runtimes' default filters do:
python -m tests.support.deny_bpf CMD ARGS..."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_SYS_BPF = 321  # x86_64
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def deny_bpf() -> None:
    # classic BPF over struct seccomp_data: nr is the u32 at offset 0
    insns = [
        (0x20, 0, 0, 0),                       # ld  [0]
        (0x15, 0, 1, _SYS_BPF),                # jeq #bpf, next, skip
        (0x06, 0, 0, _RET_ERRNO | 1),          # ret ERRNO(EPERM)
        (0x06, 0, 0, _RET_ALLOW),              # ret ALLOW
    ]
    code = b"".join(struct.pack("<HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(buf))
    fprog = ctypes.create_string_buffer(prog, len(prog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    deny_bpf()
    os.execvp(sys.argv[1], sys.argv[1:])
