"""Read and write one element of a BPF map by its descriptor, with the
bpf(2) system call itself: the master never maps libbcc (the compile helper
does, and exits), so the QUIC generation it publishes on a reload and the
counters it reports go through here."""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2


class MapError(OSError):
    pass


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(cmd: int, map_fd: int, key: ctypes.Array[ctypes.c_char],
          value: ctypes.Array[ctypes.c_char]) -> None:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise MapError(38, "bpf(2) number unknown on this architecture")
    # union bpf_attr for BPF_MAP_*_ELEM: map_fd u32 (+pad), key u64, value u64, flags u64
    attr = (ctypes.c_uint64 * 4)(map_fd, ctypes.addressof(key), ctypes.addressof(value), 0)
    if _libc().syscall(nr, cmd, attr, ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise MapError(err, f"bpf map fd {map_fd}: {os.strerror(err)}")


def update_u32(map_fd: int, key: int, value: int) -> None:
    """map[key] = value for a map of u32 keys and u32 values."""
    _call(_BPF_MAP_UPDATE_ELEM, map_fd, ctypes.create_string_buffer(key.to_bytes(4, "little"), 4),
          ctypes.create_string_buffer(value.to_bytes(4, "little"), 4))


def lookup_u64(map_fd: int, key: int) -> int:
    """map[key] for a map of u32 keys and u64 values."""
    value = ctypes.create_string_buffer(8)
    _call(_BPF_MAP_LOOKUP_ELEM, map_fd, ctypes.create_string_buffer(key.to_bytes(4, "little"), 4),
          value)
    return int.from_bytes(value.raw, "little")
