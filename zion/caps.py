"""Linux capabilities via capget(2)/capset(2), without libcap.

The readiness probe reads the effective set (a uid of 0 says nothing: under
`capsh --drop=cap_bpf,cap_sys_admin` root cannot load eBPF). Workers give up
every capability right after fork (zion/privileges.py).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET = 125  # x86_64
_SYS_CAPSET = 126

_NAMES = {CAP_NET_BIND_SERVICE: "cap_net_bind_service", CAP_NET_ADMIN: "cap_net_admin",
          CAP_SYS_ADMIN: "cap_sys_admin", CAP_PERFMON: "cap_perfmon", CAP_BPF: "cap_bpf"}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _get() -> tuple[_Header, ctypes.Array[_Data]]:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.syscall(_SYS_CAPGET, ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return header, data


def effective() -> set[int]:
    _, data = _get()
    mask = data[0].effective | (data[1].effective << 32)
    return {bit for bit in range(64) if mask >> bit & 1}


def user_namespace() -> str | None:
    """This process's uid map when it is not the initial user namespace's
    (a rootless container, `unshare -U`), else None. Capabilities held there
    do not count for bpf(2): the kernel asks for CAP_BPF in the initial
    namespace (bpf_capable), so /proc/self/status may say effective while
    every bpf() call answers EPERM."""
    try:
        fields = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return None
    return None if fields == ["0", "0", "4294967295"] else " ".join(fields)


def name(cap: int) -> str:
    return _NAMES.get(cap, f"cap_{cap}")


def clear() -> None:
    """Empty the effective, permitted and inheritable sets (allowed without
    privilege: a process may always give capabilities up)."""
    header, data = _get()
    for word in data:
        word.effective = word.permitted = word.inheritable = 0
    header.pid = 0
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def keep_only(keep: set[int]) -> set[int]:
    """Lower the effective and permitted sets to `keep` (what of it this
    process has); return what is left. Lowering needs no privilege."""
    header, data = _get()
    for word_index, word in enumerate(data):
        mask = sum(1 << (cap - 32 * word_index) for cap in keep
                   if 32 * word_index <= cap < 32 * (word_index + 1))
        word.effective &= mask
        word.permitted &= mask
        word.inheritable = 0
    header.pid = 0
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return effective()
