"""bcc's missing typed support for BPF_PROG_TYPE_SK_REUSEPORT. No policy.

bcc (0.26 and upstream) has no BPF.SK_REUSEPORT constant, cannot declare a
REUSEPORT_SOCKARRAY map, and a table passed to bpf_sk_select_reuseport stays
an unrelocated scalar the verifier rejects (see bpf/README.md). So the
sockarray is created from userspace with libbcc's bcc_create_map and the
program text refers to it as a pseudo fd. Every failure is a `ShimError`
naming the operation, the errno and the tail of what libbcc, clang or the
verifier printed; deciding what that means is policy.py's job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
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
_BPF_MAP_UPDATE_ELEM = 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68  # Linux 5.8+


class ShimOp(StrEnum):
    CREATE_SOCKARRAY = "create_sockarray"
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


class ReuseportSockArray:
    """BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, key u32 slot, value u64 socket fd.

    A socket can be in one sockarray only (the kernel keeps the array in
    sk_user_data; a second insert is EBUSY), so a program replacing another
    on the same group must use the same array. Programs share it by taking a
    reference; the map fd closes when the last one lets go.
    """

    def __init__(self, lib: Any, fd: int) -> None:
        self._lib = lib
        self.fd = fd
        self._refs = 1

    @classmethod
    def create(cls, lib: Any, max_entries: int) -> ReuseportSockArray:
        lib.bcc_create_map.restype = ctypes.c_int
        lib.bcc_create_map.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fd = int(lib.bcc_create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, b"zion_socks", 4, 8,
                                    max_entries, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise ShimError(ShimOp.CREATE_SOCKARRAY, err, "",
                            f"creating the reuseport sockarray: {os.strerror(err)}")
        return cls(lib, fd)

    def acquire(self) -> ReuseportSockArray:
        self._refs += 1
        return self

    def set(self, index: int, sock: socket.socket) -> None:
        key = ctypes.c_uint32(index)
        value = ctypes.c_uint64(sock.fileno())
        if self._lib.bpf_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), 0) != 0:
            err = ctypes.get_errno()
            raise ShimError(ShimOp.SET, err, "",
                            f"sockarray[{index}] = listener fd {sock.fileno()}: "
                            f"{os.strerror(err)} (not a bound SO_REUSEPORT listener?)")

    def close(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@cache
def _libc() -> ctypes.CDLL:
    # Loaded once: the master calls sockarray_set every time it moves a
    # blocked worker's queue, and dlopen is most of such a call.
    return ctypes.CDLL(None, use_errno=True)


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


class SkReuseport:
    """A compiled and loaded SK_REUSEPORT program: attach, detach, close."""

    def __init__(self, bpf: Any, fn: Any, text: str, migrate: bool = False) -> None:
        self._bpf = bpf
        self.text = text
        self.migrate = migrate
        self.fd: int = fn.fd
        self.prog_id = prog_id_of(self.fd)
        self.slots_fd: int = bpf[b"zion_slots"].map_fd

    @classmethod
    def load(cls, bcc: ModuleType, text: str, kernel_source: str | None,
             func: bytes = b"zion_demux", migrate: bool = False) -> SkReuseport:
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
            with _captured_stderr() as err:
                try:
                    fn = bpf.load_func(func, BPF_PROG_TYPE_SK_REUSEPORT,
                                       attach_type=BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
                                       if migrate else -1)
                except Exception as exc:
                    fn, failure = None, exc
            if fn is None:
                bpf.cleanup()
                # bcc turns EPERM into this text and keeps no errno.
                eperm = "super-user" in str(failure)
                raise ShimError(ShimOp.LOAD, errno_mod.EPERM if eperm else None,
                                _last_lines(err[0], 2), str(failure))
        finally:
            if kernel_source:
                if previous is None:
                    os.environ.pop("BCC_KERNEL_SOURCE", None)
                else:
                    os.environ["BCC_KERNEL_SOURCE"] = previous
        return cls(bpf, fn, text, migrate)

    @classmethod
    def load_migrating(cls, bcc: ModuleType, make_text: Callable[[bool], str],
                       kernel_source: str | None, want: bool = True
                       ) -> tuple[SkReuseport, str | None]:
        """Load as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE when wanted and the kernel
        takes it (5.14+), else as a plain selector; the second value says why
        not. `make_text(migrate)` is the program text for either."""
        if not want:
            return cls.load(bcc, make_text(False), kernel_source), "disabled by settings"
        try:
            return cls.load(bcc, make_text(True), kernel_source, migrate=True), None
        except ShimError as exc:
            why = exc.detail or exc.log_tail or str(exc)
        return cls.load(bcc, make_text(False), kernel_source), why

    def attach(self, sock: socket.socket) -> None:
        attach(self.fd, sock)

    @staticmethod
    def detach(sock: socket.socket) -> None:
        """Remove the group's program: back to the kernel's hash."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError as exc:
            raise ShimError(ShimOp.DETACH, exc.errno, "", exc.strerror or "") from None

    @property
    def fds(self) -> tuple[int, ...]:
        if self._bpf is None:
            return ()
        return tuple(fn.fd for fn in self._bpf.funcs.values() if fn.fd >= 0)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


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
