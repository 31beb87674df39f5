"""The SK_REUSEPORT demux: compile bpf/zion_demux.c with bcc, load it, fill the
sockarray with the listener group, attach it. Never fatal: `setup_demux`
turns every failure into a structured `bpf_demux=fallback reason=...` warning
and the kernel's reuseport hash distributes connections instead.

bcc (0.26 and upstream) has no typed support for this program type: no
BPF.SK_REUSEPORT constant, no way to declare a REUSEPORT_SOCKARRAY map, and a
table passed to bpf_sk_select_reuseport stays an unrelocated scalar the
verifier rejects. `SkReuseport` is the small typed shim that fills the gap
(see bpf/README.md): the sockarray is created from userspace with libbcc's
bcc_create_map and referenced in the program text as a pseudo fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import importlib.util
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from zion import caps
from zion.errors import DemuxError
from zion.log import get_logger
from zion.status_board import StatusBoard

if TYPE_CHECKING:
    from zion.config import Settings
    from zion.listeners import ListenerGroup

logger = get_logger("zion.demux")

BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
MODES = {"hash": 0, "least-loaded": 1, "cpu": 2}
MAX_WORKERS = 256
# Debian's python3-bpfcc; loaded by path so the rest of dist-packages stays out.
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc/__init__.py")
KERNEL_MINIMUM = (5, 5)


def object_path() -> Path:
    """The program source shipped inside the installed package."""
    traversable = resources.files("zion") / "_data" / "zion_demux.c"
    return Path(str(traversable))


def import_bcc() -> ModuleType:
    """Import iovisor bcc: from the path, else Debian's copy by file location."""
    try:
        import bcc
    except ModuleNotFoundError as exc:
        if exc.name != "bcc":
            raise DemuxError("no_bcc", f"bcc needs a module that is missing: {exc}") from None
        bcc = _import_debian_bcc()
    except (ImportError, OSError) as exc:
        raise DemuxError("no_bcc", f"bcc does not import: {exc}") from None
    if not hasattr(bcc, "BPF"):
        raise DemuxError("no_bcc", "the 'bcc' module found is not iovisor bcc "
                         "(PyPI's bcc is an unrelated package)")
    module: ModuleType = bcc
    return module


def _import_debian_bcc() -> ModuleType:
    if not DEBIAN_BCC.exists():
        raise DemuxError("no_bcc", "bcc is not installed (Debian package python3-bpfcc)")
    spec = importlib.util.spec_from_file_location(
        "bcc", DEBIAN_BCC, submodule_search_locations=[str(DEBIAN_BCC.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        del sys.modules["bcc"]
        raise DemuxError("no_bcc", f"Debian's bcc does not import: {exc}") from None
    return module


def kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def program_text(source: str, workers: int, sockarray_fd: int, mode: str,
                 stall_ns: int) -> str:
    """The exact text bcc compiles: the parameters as #defines, then the source."""
    return (
        f"/* parameters set by zion/bpf_demux.py */\n"
        f"#define ZION_WORKERS {workers}\n"
        f"#define ZION_SOCKARRAY_FD {sockarray_fd}\n"
        f"#define ZION_MODE {MODES[mode]} /* {mode} */\n"
        f"#define ZION_STALL_NS {stall_ns}ULL\n"
        f"#line 1 \"zion_demux.c\"\n"
        f"{source}"
    )


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Catch what libbcc/clang/the verifier print on fd 2, for the error line."""
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


def _prog_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("prog_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class SkReuseport:
    """bcc's missing typed helper for BPF_PROG_TYPE_SK_REUSEPORT.

    Shaped like bcc's own helpers: construct (compile + load), `fill` the
    sockarray with the group's sockets, `attach` to the group, `close`.
    """

    def __init__(self, workers: int, mode: str = "least-loaded", stall_ns: int = 100_000_000,
                 kernel_source: str | None = None, source_path: Path | None = None,
                 sockarray_fd: int | None = None) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise DemuxError("probe_failed", f"the demux supports 1..{MAX_WORKERS} workers")
        bcc = import_bcc()
        from bcc.libbcc import lib

        self.workers = workers
        self._lib = lib
        self._bpf: Any = None
        self._fn: Any = None
        self.sockarray_fd = -1
        self.owns_sockarray = sockarray_fd is None
        # A socket can be in one sockarray only (the kernel keeps the array in
        # sk_user_data; a second insert is EBUSY), so a program replacing
        # another on the same group must use the same array.
        fd = self._create_sockarray(lib) if sockarray_fd is None else sockarray_fd
        self.sockarray_fd = fd
        path = source_path or object_path()
        try:
            source = path.read_text()
        except OSError as exc:
            self.close()
            raise DemuxError("probe_failed", f"cannot read {path}: {exc.strerror}") from None
        self.text = program_text(source, workers, fd, mode, stall_ns)
        try:
            self._compile_and_load(bcc, kernel_source)
        except DemuxError:
            self.close()
            raise
        fn: Any = self._fn
        loaded: Any = self._bpf
        self.fd: int = fn.fd
        self.prog_id = _prog_id(self.fd)
        self.slots_fd: int = loaded[b"zion_slots"].map_fd

    @staticmethod
    def _create_sockarray(lib: Any) -> int:
        lib.bcc_create_map.restype = ctypes.c_int
        lib.bcc_create_map.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_int]
        # key u32 slot index, value u64 socket fd (the kernel stores the socket).
        # Sized for the most workers ever (2 KiB), so a reload can grow the group.
        fd = int(lib.bcc_create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, b"zion_socks", 4, 8,
                                    MAX_WORKERS, 0))
        if fd < 0:
            err = ctypes.get_errno()
            reason = "no_capability" if err == errno_mod.EPERM else (
                "kernel_unsupported" if err == errno_mod.EINVAL else "probe_failed")
            raise DemuxError(reason, f"creating the reuseport sockarray: {os.strerror(err)}",
                             err)
        return fd

    def _compile_and_load(self, bcc: ModuleType, kernel_source: str | None) -> None:
        previous = os.environ.get("BCC_KERNEL_SOURCE")
        if kernel_source:
            os.environ["BCC_KERNEL_SOURCE"] = kernel_source
        try:
            with _captured_stderr() as err:
                compile_error: Exception | None = None
                try:
                    self._bpf = bcc.BPF(text=self.text.encode())
                except Exception as exc:
                    compile_error = exc
            if compile_error is not None:
                log = err[0]
                reason = "no_kernel_headers" if "file not found" in log else "compile_failed"
                raise DemuxError(reason, _last_lines(log) or str(compile_error))
            with _captured_stderr() as err:
                try:
                    self._fn = self._bpf.load_func(b"zion_demux", BPF_PROG_TYPE_SK_REUSEPORT)
                except Exception as exc:
                    load_error: Exception | None = exc
                else:
                    load_error = None
            if load_error is not None:
                if "super-user" in str(load_error):
                    raise DemuxError("no_capability", "bpf(BPF_PROG_LOAD): EPERM",
                                     errno_mod.EPERM)
                detail = _last_lines(err[0], 2)
                raise DemuxError("verifier_rejected", f"{load_error}: {detail}".strip(": "))
        finally:
            if kernel_source:
                if previous is None:
                    os.environ.pop("BCC_KERNEL_SOURCE", None)
                else:
                    os.environ["BCC_KERNEL_SOURCE"] = previous

    def fill(self, sockets: Sequence[socket.socket], start: int = 0) -> None:
        """sockarray[i] = sockets[i] for i >= start (earlier slots are already
        there). Each must be a bound, listening SO_REUSEPORT socket."""
        for index, sock in enumerate(sockets):
            if index < start:
                continue
            key = ctypes.c_uint32(index)
            value = ctypes.c_uint64(sock.fileno())
            if self._lib.bpf_update_elem(self.sockarray_fd, ctypes.byref(key),
                                         ctypes.byref(value), 0) != 0:
                err = ctypes.get_errno()
                raise DemuxError("attach_failed",
                                 f"sockarray[{index}] = listener fd {sock.fileno()}: "
                                 f"{os.strerror(err)} (not a bound SO_REUSEPORT listener?)", err)

    def attach(self, sock: socket.socket) -> None:
        """Attach to the reuseport group `sock` belongs to (one call serves all)."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, self.fd)
        except OSError as exc:
            hint = " (socket is not in a SO_REUSEPORT group)" if exc.errno == errno_mod.EINVAL \
                else ""
            raise DemuxError("attach_failed",
                             f"setsockopt(SO_ATTACH_REUSEPORT_EBPF): {exc.strerror}{hint}",
                             exc.errno) from None

    @property
    def master_fds(self) -> tuple[int, ...]:
        """Descriptors workers must not keep: the program and the sockarray."""
        fds = [self.sockarray_fd]
        if self._bpf is not None:
            fds += [fn.fd for fn in self._bpf.funcs.values()]
        return tuple(fd for fd in fds if fd >= 0)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self.sockarray_fd >= 0 and self.owns_sockarray:
            os.close(self.sockarray_fd)
        self.sockarray_fd = -1


@dataclass
class DemuxOutcome:
    """What the master logs, shows in /_zion/status and hands to workers."""

    state: str  # attached | prepared (loaded, not yet attached) | fallback | disabled
    mode: str
    reason: str | None = None
    error: str | None = None
    fd: int | None = None
    prog_id: int | None = None
    board: StatusBoard | None = None
    shim: SkReuseport | None = None
    master_fds: tuple[int, ...] = field(default=())

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "mode": self.mode if self.state == "attached" else None,
                "reason": self.reason, "error": self.error, "fd": self.fd,
                "prog_id": self.prog_id}

    def close(self) -> None:
        if self.shim is not None:
            self.shim.close()
            self.shim = None


def cache_dir(settings: Settings) -> Path:
    from zion.tls import state_dir

    return state_dir(settings.tls) / "kernel-headers"


def preflight(settings: Settings) -> str | None:
    """Cheap checks before compiling; returns the kernel source for bcc.
    Raises DemuxError with a readiness state as reason."""
    from zion import kheaders

    if kernel_version() < KERNEL_MINIMUM:
        raise DemuxError("kernel_unsupported",
                         f"kernel {os.uname().release} < {'.'.join(map(str, KERNEL_MINIMUM))}")
    have = caps.effective()
    if caps.CAP_BPF not in have and caps.CAP_SYS_ADMIN not in have:
        raise DemuxError("no_capability", "neither cap_bpf nor cap_sys_admin is effective",
                         errno_mod.EPERM)
    import_bcc()
    source, _ = kheaders.find(settings.demux.kernel_headers, cache_dir(settings))
    return source


def load(settings: Settings, workers: int, sockarray_fd: int | None = None) -> SkReuseport:
    kernel_source = preflight(settings)
    program = Path(settings.demux.program) if settings.demux.program else None
    return SkReuseport(workers, settings.demux.mode,
                       settings.demux.stall_threshold_ms * 1_000_000, kernel_source, program,
                       sockarray_fd)


def setup_demux(settings: Settings, group: ListenerGroup, attach: bool = True,
                previous: DemuxOutcome | None = None) -> DemuxOutcome:
    """Load and attach, or explain why not. Never raises: boot goes on.

    With attach=False (a reload that changes the group) the program is loaded
    and its sockarray filled, but the running program keeps routing until
    `attach_prepared` swaps it in, once the new workers are ready. A
    `previous` attached program lends its sockarray: slots it already holds
    keep their socket, only the new ones are inserted."""
    mode = settings.demux.mode
    count = len(group.sockets)
    if not settings.demux.enabled:
        logger.info("demux_disabled", bpf_demux="disabled", reason="flag",
                    source=settings.demux_disabled_by)
        return DemuxOutcome("disabled", mode, reason="flag")
    shim: SkReuseport | None = None
    try:
        lender = previous.shim if previous is not None and previous.state == "attached" else None
        if lender is not None:
            shim = load(settings, count, lender.sockarray_fd)
            shim.fill(group.sockets, start=min(lender.workers, count))
        else:
            shim = load(settings, count)
            shim.fill(group.sockets)
        if attach:
            shim.attach(group.sockets[0])
        board = StatusBoard.from_map_fd(shim.slots_fd, count)
    except DemuxError as exc:
        if shim is not None:
            shim.close()
        logger.warning("demux_fallback", bpf_demux="fallback", reason=exc.reason,
                       error=exc.detail, errno=exc.errno, using="kernel reuseport hash")
        return DemuxOutcome("fallback", mode, reason=exc.reason, error=exc.detail)
    except Exception as exc:  # an unexpected bcc failure must not stop boot either
        if shim is not None:
            shim.close()
        logger.warning("demux_fallback", bpf_demux="fallback", reason="probe_failed",
                       error=repr(exc), using="kernel reuseport hash")
        return DemuxOutcome("fallback", mode, reason="probe_failed", error=repr(exc))
    outcome = DemuxOutcome("attached" if attach else "prepared", mode, fd=shim.fd,
                           prog_id=shim.prog_id, board=board, shim=shim,
                           master_fds=shim.master_fds)
    if attach:
        _log_attached(outcome, count, settings)
    return outcome


def _log_attached(outcome: DemuxOutcome, count: int, settings: Settings) -> None:
    logger.info("demux_attached", bpf_demux="attached", fd=outcome.fd, prog_id=outcome.prog_id,
                mode=outcome.mode, workers=count,
                stall_threshold_ms=settings.demux.stall_threshold_ms)


def attach_prepared(outcome: DemuxOutcome, sock: socket.socket, count: int,
                    settings: Settings) -> None:
    """Swap a prepared program in for the group's current one (one setsockopt:
    the kernel replaces the group's program atomically). Never raises."""
    assert outcome.shim is not None and outcome.state == "prepared"
    try:
        outcome.shim.attach(sock)
    except DemuxError as exc:
        logger.warning("demux_fallback", bpf_demux="fallback", reason=exc.reason,
                       error=exc.detail, errno=exc.errno, using="kernel reuseport hash")
        outcome.state, outcome.reason, outcome.error = "fallback", exc.reason, exc.detail
        return
    outcome.state = "attached"
    _log_attached(outcome, count, settings)


def hand_over(old: DemuxOutcome, new: DemuxOutcome) -> None:
    """The sockarray the old program lent now belongs to the new one."""
    if old.shim is not None and new.shim is not None and (
            old.shim.sockarray_fd == new.shim.sockarray_fd):
        old.shim.owns_sockarray, new.shim.owns_sockarray = False, True


def detach(sock: socket.socket) -> None:
    """Remove the group's program: back to the kernel's hash (Linux 5.8+)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        logger.warning("demux_detach_failed", error=exc.strerror)
