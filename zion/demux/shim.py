"""bcc's missing typed support for BPF_PROG_TYPE_SK_REUSEPORT. No policy.

bcc (0.26 and upstream) has no BPF.SK_REUSEPORT constant, cannot declare a
REUSEPORT_SOCKARRAY map, and a table passed to bpf_sk_select_reuseport stays
an unrelocated scalar the verifier rejects (see bpf/README.md). So the
sockarray is created from userspace with bpf(BPF_MAP_CREATE) and the
program text refers to it as a pseudo fd.

bcc only compiles (compile_program, in a short-lived helper or at set-up);
loading is bpf(2) itself (map_create, map_update, prog_load) over bytecode
whose map references zion/demux/objects.py rewrote, as libbpf's relocations
do, so a process with no kernel headers and no LLVM loads the same program.
Every failure is a `ShimError`
naming the operation, the errno and the tail of what libbcc, clang or the
verifier printed; deciding what that means is policy.py's job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from functools import cache
from types import ModuleType
from typing import Any

BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
# enum bpf_attach_type; Linux 5.14 (bcc has no constant). A program loaded
# with it also picks the new listener for connections queued on one that
# closes (md->migrating_sk), whatever net.ipv4.tcp_migrate_req says.
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
_BPF_MAP_CREATE = 0
_BPF_MAP_UPDATE_ELEM = 2
_BPF_PROG_LOAD = 5
_BPF_OBJ_GET_INFO_BY_FD = 15
# union bpf_attr is at most this big on kernels we know; the kernel accepts a
# larger one only if the bytes it does not know are zero, and ours are.
_ATTR_SIZE = 128
BPF_F_MMAPABLE = 1 << 10
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68  # Linux 5.8+


class ShimOp(StrEnum):
    CREATE_SOCKARRAY = "create_sockarray"
    CREATE_MAP = "create_map"
    COMPILE = "compile"
    LOAD = "load"
    SET = "set"
    ATTACH = "attach"
    DETACH = "detach"


class ShimError(Exception):
    def __init__(self, op: ShimOp, errno: int | None, log_tail: str, detail: str = "") -> None:
        super().__init__(f"{op}: {detail or log_tail or os.strerror(errno or 0)}")
        self.op = op
        self.errno = errno
        self.log_tail = log_tail
        self.detail = detail


@cache
def _libc() -> ctypes.CDLL:
    # Loaded once: the master calls sockarray_set every time it moves a
    # blocked worker's queue, and dlopen is most of such a call.
    return ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    """bpf(2) itself (the loader in the master never maps libbcc): (result, errno)."""
    import platform

    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return -1, errno_mod.ENOSYS
    res = int(_libc().syscall(nr, cmd, attr, len(attr)))
    return res, (ctypes.get_errno() if res < 0 else 0)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """BPF_MAP_CREATE; the new map's descriptor."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIIIIII16s", attr, 0, map_type, key_size, value_size, max_entries,
                     flags, 0, 0, _bpf_name(name))
    fd, err = _bpf(_BPF_MAP_CREATE, attr)
    if fd < 0:
        raise ShimError(ShimOp.CREATE_SOCKARRAY if map_type == BPF_MAP_TYPE_REUSEPORT_SOCKARRAY
                        else ShimOp.CREATE_MAP, err, "",
                        f"bpf(BPF_MAP_CREATE) {name or map_type}: {os.strerror(err)}")
    return fd


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    """BPF_MAP_UPDATE_ELEM with raw key and value bytes."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(kbuf),
                     ctypes.addressof(vbuf), 0)
    res, err = _bpf(_BPF_MAP_UPDATE_ELEM, attr)
    if res != 0:
        raise ShimError(ShimOp.SET, err, "", f"bpf(BPF_MAP_UPDATE_ELEM) on map fd {map_fd}: "
                        f"{os.strerror(err)}")


def prog_load(prog_type: int, insns: bytes, license: str, name: str,
              attach_type: int = 0) -> int:
    """BPF_PROG_LOAD of ready bytecode (map references already pointing at
    this process's map descriptors); the program's descriptor. A refusal is
    retried once with the verifier's log, whose tail goes into the error."""
    lic = ctypes.create_string_buffer(license.encode())
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(0)
    first_err = 0
    for log_level in (0, 1):
        if log_level:
            # ENOSPC then only says the log is longer: since Linux 6.4 the
            # kernel keeps its end, where the verifier says why.
            log = ctypes.create_string_buffer(4 << 20)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
        # kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type
        struct.pack_into("<IIQQIIQII16sII", attr, 0, prog_type, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), log_level,
                         len(log) if log_level else 0,
                         ctypes.addressof(log) if log_level else 0, 0, 0, _bpf_name(name),
                         0, attach_type)
        fd, err = _bpf(_BPF_PROG_LOAD, attr)
        if fd >= 0:
            return fd
        first_err = first_err or err
        if err in (errno_mod.EPERM, errno_mod.ENOSYS):
            break
    tail = _last_lines(log.value.decode(errors="replace"), 2) if len(log) else ""
    raise ShimError(ShimOp.LOAD, first_err, tail,
                    f"bpf(BPF_PROG_LOAD): {os.strerror(first_err)}")


def map_info(map_fd: int) -> tuple[str, int, int, int, int, int]:
    """The kernel's own account of a map (BPF_OBJ_GET_INFO_BY_FD, struct
    bpf_map_info): name, type, key size, value size, max entries, flags."""
    info = ctypes.create_string_buffer(80)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, map_fd, len(info), ctypes.addressof(info))
    res, err = _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    if res != 0:
        raise ShimError(ShimOp.COMPILE, err, "", f"bpf(BPF_OBJ_GET_INFO_BY_FD) on map fd "
                        f"{map_fd}: {os.strerror(err)}")
    map_type, _id, key, value, entries, flags, name = struct.unpack_from("<IIIIII16s", info)
    return name.split(b"\0")[0].decode(), map_type, key, value, entries, flags


def _bpf_name(name: str) -> bytes:
    # The kernel takes [A-Za-z0-9_.], 15 characters and a NUL.
    return "".join(c for c in name if c.isalnum() or c in "_.")[:15].encode()


def sockarray_set(map_fd: int, index: int, sock: socket.socket) -> None:
    """sockarray[index] = sock with the bpf(2) system call itself, for the
    master, which never maps libbcc (a replaced listener joins the array)."""
    import platform

    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise ShimError(ShimOp.SET, errno_mod.ENOSYS, "", "bpf(2) number unknown here")
    key = ctypes.c_uint32(index)
    value = ctypes.c_uint64(sock.fileno())
    # union bpf_attr for BPF_MAP_*_ELEM: map_fd u32, pad, key u64, value u64, flags u64
    attr = (ctypes.c_uint64 * 4)(map_fd, ctypes.addressof(key), ctypes.addressof(value), 0)
    if _libc().syscall(nr, _BPF_MAP_UPDATE_ELEM, attr, ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise ShimError(ShimOp.SET, err, "", f"sockarray[{index}] = listener fd "
                        f"{sock.fileno()}: {os.strerror(err)}")


class Compiled:
    """A program bcc compiled (its maps created, nothing loaded): its
    bytecode, with each map reference a BPF_PSEUDO_MAP_FD of this process."""

    def __init__(self, bpf: Any, func: bytes) -> None:
        from bcc.libbcc import lib

        self._bpf = bpf
        start = lib.bpf_function_start(bpf.module, func)
        if not start:
            bpf.cleanup()
            raise ShimError(ShimOp.COMPILE, None, "", f"no function {func.decode()} in the "
                            "program")
        self.insns = ctypes.string_at(start, lib.bpf_function_size(bpf.module, func))
        self.license = (lib.bpf_module_license(bpf.module) or b"GPL").decode()

    def close(self) -> None:
        self._bpf.cleanup()


def compile_program(bcc: ModuleType, text: str, kernel_source: str | None,
                    func: bytes = b"zion_demux") -> Compiled:
    """bcc + LLVM: C to bytecode (bcc also creates the program's maps)."""
    previous = os.environ.get("BCC_KERNEL_SOURCE")
    if kernel_source:
        os.environ["BCC_KERNEL_SOURCE"] = kernel_source
    try:
        with _captured_stderr() as err:
            try:
                bpf = bcc.BPF(text=text.encode())
            except Exception as exc:
                bpf, failure = None, exc
        if bpf is None:
            raise ShimError(ShimOp.COMPILE, None, _last_lines(err[0]), str(failure))
    finally:
        if kernel_source:
            if previous is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = previous
    return Compiled(bpf, func)


def detach(sock: socket.socket) -> None:
    """Remove the group's program: back to the kernel's hash."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        raise ShimError(ShimOp.DETACH, exc.errno, "", exc.strerror or "") from None


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Catch what libbcc, clang and the verifier print on fd 2."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def attach(prog_fd: int, sock: socket.socket) -> None:
    """Attach a loaded program to the reuseport group `sock` belongs to (one
    call serves all; an attached program is replaced atomically). Needs only
    the descriptor, not bcc."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog_fd)
    except OSError as exc:
        hint = " (socket is not in a SO_REUSEPORT group)" if exc.errno == errno_mod.EINVAL \
            else ""
        raise ShimError(ShimOp.ATTACH, exc.errno, "",
                        f"setsockopt(SO_ATTACH_REUSEPORT_EBPF): {exc.strerror}{hint}"
                        ) from None


def prog_id_of(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("prog_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
