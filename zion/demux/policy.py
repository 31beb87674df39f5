"""What the master does with the demux: set it up for a group (or explain in
one warning line why the kernel hash routes instead), prepare a program for
a reload, and swap it in. Never fatal: boot goes on without the demux.

This is the one place where a shim failure (an errno, what clang or the
verifier printed) becomes a FallbackReason, and the one place the fallback
line is logged.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zion.demux import headers, objects, preflight, shim
from zion.demux.board import BUSY_BEATS, IDLE_BEATS, StatusBoard
from zion.demux.compile_helper import compile_in_helper
from zion.demux.objects import DemuxObject
from zion.demux.program import MAX_WORKERS, ProgramConfig, source_path
from zion.demux.reasons import DemuxState, FallbackReason, Unavailable
from zion.demux.shim import ShimError, ShimOp, attach, prog_id_of
from zion.listeners import ListenerGroup
from zion.log import get_logger
from zion.settings import Settings

logger = get_logger("zion.demux")


def classify(err: ShimError) -> FallbackReason:
    """The reason a shim failure is reported under."""
    if err.op is ShimOp.CREATE_SOCKARRAY:
        if err.errno == errno_mod.EPERM:
            # the first bpf() call, made once preflight.check found CAP_BPF
            # effective in the initial user namespace: the call itself is refused
            return FallbackReason.BPF_SYSCALL_REFUSED
        return (FallbackReason.KERNEL_UNSUPPORTED if err.errno == errno_mod.EINVAL
                else FallbackReason.PROBE_FAILED)
    if err.op is ShimOp.COMPILE:
        # clang's "fatal error: 'linux/bpf.h' file not found" and the like
        return (FallbackReason.NO_KERNEL_HEADERS if "file not found" in err.log_tail
                else FallbackReason.COMPILE_FAILED)
    if err.op is ShimOp.LOAD:
        return (FallbackReason.NO_CAPABILITY if err.errno == errno_mod.EPERM
                else FallbackReason.VERIFIER_REJECTED)
    if err.op in (ShimOp.SET, ShimOp.ATTACH):
        return FallbackReason.ATTACH_FAILED
    return FallbackReason.PROBE_FAILED


def describe(err: ShimError) -> str:
    if err.op is ShimOp.LOAD and err.errno == errno_mod.EPERM:
        return "bpf(BPF_PROG_LOAD): EPERM"
    return " | ".join(p for p in (err.detail, err.log_tail) if p) or str(err)


@dataclass
class Program:
    """A loaded program, as descriptors the compile helper sent back: the
    program, this program's reference to the group's sockarray, and the
    status map the workers write."""

    prog_fd: int
    sockarray_fd: int
    slots_fd: int
    text: str
    workers: int
    # Loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: a listener that closes
    # hands its queue to the program's choice (else the reason it is not).
    migrate: bool = False
    no_migrate_why: str | None = None
    # Which object was loaded: kept (where, built by what) or compiled now.
    origin: str = ""

    @property
    def prog_id(self) -> int | None:
        return prog_id_of(self.prog_fd)

    @property
    def master_fds(self) -> tuple[int, ...]:
        """Descriptors workers must not keep."""
        return (self.prog_fd, self.sockarray_fd, self.slots_fd)

    def attach(self, sock: socket.socket) -> None:
        attach(self.prog_fd, sock)

    def close(self) -> None:
        for fd in self.master_fds:
            os.close(fd)
        self.prog_fd = self.sockarray_fd = self.slots_fd = -1


def read_source(settings: Settings) -> tuple[str, bool]:
    """The program source, and whether it is one of the operator's own."""
    path = Path(settings.demux.program) if settings.demux.program else source_path()
    try:
        return path.read_text(), bool(settings.demux.program)
    except OSError as exc:
        raise Unavailable(FallbackReason.PROBE_FAILED,
                          f"cannot read {path}: {headers.errno_name(exc.errno)}",
                          exc.errno) from None


def program_config(settings: Settings, workers: int) -> ProgramConfig:
    demux = settings.demux
    beat_ns = demux.heartbeat_interval_ms * 1_000_000
    return ProgramConfig(workers, demux.stall_threshold_ms * 1_000_000, BUSY_BEATS * beat_ns,
                         (IDLE_BEATS + BUSY_BEATS) * beat_ns)


def obtain(settings: Settings, source: str, custom: bool, migrate: bool,
           rebuild_why: str | None = None) -> tuple[DemuxObject, str]:
    """The compiled object for this variant, and where it came from: kept
    (the package's, or the state directory's), else compiled now by bcc in
    the helper and kept. `rebuild_why`: the kept one was refused; compile."""
    mode = settings.demux.mode
    dirs = objects.locations(settings.demux.objects, preflight.cache_dir(settings).parent)
    name = objects.file_name(source, mode, migrate, custom)
    sha = objects.text_sha256(source, mode, migrate)
    if rebuild_why is None:
        obj, ignored = objects.find(dirs, name, sha)
        for line in ignored:
            logger.warning("demux_object_ignored", error=line, using="a new compile if possible")
        if obj is not None:
            return obj, f"kept object {obj.path} ({obj.built_with})"
    searched = ", ".join(str(d / name) for d in dirs)
    try:
        kernel_source, how = headers.find(settings.demux.kernel_headers,
                                          preflight.cache_dir(settings))
        obj = compile_in_helper(source, mode, migrate, kernel_source)
    except Unavailable as exc:
        raise Unavailable(exc.reason, f"no usable compiled object ({searched}) and it cannot "
                          f"be compiled here: {exc.detail}", exc.errno) from None
    try:
        path = objects.save(obj, dirs[-1:] if not settings.demux.objects else dirs, name)
        kept = f"kept in {path}"
    except OSError as exc:
        kept = f"not kept: {exc.filename}: {headers.errno_name(exc.errno)}"
    return obj, f"compiled now by bcc against {how}; {kept}"


def load(settings: Settings, group: ListenerGroup, lender: Program | None = None) -> Program:
    """Load the program for `group` from its compiled object (compiling it
    first if none is kept) and fill its sockarray (slots a lender's array
    already holds keep their socket). Raises Unavailable or ShimError."""
    count = len(group.sockets)
    if not 1 <= count <= MAX_WORKERS:
        raise Unavailable(FallbackReason.PROBE_FAILED,
                          f"the demux supports 1..{MAX_WORKERS} workers")
    source, custom = read_source(settings)
    config = program_config(settings, count)
    sockarray_fd = (os.dup(lender.sockarray_fd) if lender is not None else
                    shim.map_create(shim.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_WORKERS,
                                    name=objects.SOCKARRAY))
    try:
        loaded, obj, origin, why = _load_variant(settings, source, custom, sockarray_fd, config)
        try:
            for index in range(min(lender.workers, count) if lender else 0, count):
                shim.sockarray_set(sockarray_fd, index, group.sockets[index])
        except BaseException:
            os.close(loaded.prog_fd)
            os.close(loaded.slots_fd)
            raise
    except BaseException:
        os.close(sockarray_fd)
        raise
    return Program(loaded.prog_fd, sockarray_fd, loaded.slots_fd, obj.text, count,
                   obj.migrate, why, origin)


def _load_variant(settings: Settings, source: str, custom: bool, sockarray_fd: int,
                  config: ProgramConfig) -> tuple[objects.Loaded, DemuxObject, str, str | None]:
    """SELECT_OR_MIGRATE when wanted and the kernel takes it (5.14+), else a
    plain selector; the last value says why not."""
    why = None if settings.demux.migrate else "disabled by settings"
    variants = [True, False] if settings.demux.migrate else [False]
    for migrate in variants:
        obj, origin = obtain(settings, source, custom, migrate)
        try:
            try:
                return objects.instantiate(obj, sockarray_fd, config), obj, origin, why
            except ShimError as exc:
                if obj.path is None or exc.op is not ShimOp.LOAD or exc.errno == errno_mod.EPERM:
                    raise
                # A kept object the kernel refuses: never retried blindly.
                refused = f"the kernel refused {obj.path}: {describe(exc)}"
                logger.warning("demux_object_ignored", error=refused,
                               using="a new compile if possible")
                obj, origin = obtain(settings, source, custom, migrate, refused)
                return objects.instantiate(obj, sockarray_fd, config), obj, origin, why
        except ShimError as exc:
            if not migrate or exc.op is not ShimOp.LOAD or exc.errno == errno_mod.EPERM:
                raise
            why = exc.detail + (f" | {exc.log_tail}" if exc.log_tail else "")
    raise AssertionError("unreachable: the last variant raises or returns")


@dataclass
class DemuxOutcome:
    """What the master logs, shows in /_zion/status and hands to workers."""

    state: DemuxState
    mode: str
    reason: FallbackReason | None = None
    error: str | None = None
    program: Program | None = None
    board: StatusBoard | None = None

    @property
    def fd(self) -> int | None:
        return self.program.prog_fd if self.program else None

    @property
    def prog_id(self) -> int | None:
        return self.program.prog_id if self.program else None

    @property
    def routing(self) -> bool:
        return self.state is DemuxState.ATTACHED

    @property
    def master_fds(self) -> tuple[int, ...]:
        return self.program.master_fds if self.program else ()

    @property
    def migrates(self) -> bool:
        """A closing listener's queue goes to a worker the program picks."""
        return self.routing and self.program is not None and self.program.migrate

    def info(self) -> dict[str, Any]:
        return {"state": str(self.state), "mode": self.mode if self.routing else None,
                "reason": str(self.reason) if self.reason else None, "error": self.error,
                "fd": self.fd, "prog_id": self.prog_id, "migrate": self.migrates}

    def close(self) -> None:
        if self.program is not None:
            self.program.close()
            self.program = None


def setup(settings: Settings, group: ListenerGroup, attach: bool = True,
          previous: DemuxOutcome | None = None) -> DemuxOutcome:
    """Load and attach, or explain why not. Never raises: boot goes on.

    With attach=False (a reload that changes the group) the program is loaded
    and its sockarray filled, but the running program keeps routing until
    `swap` puts it in, once the new workers are ready. A `previous` routing
    program lends its sockarray."""
    mode = settings.demux.mode
    if not settings.demux.enabled:
        logger.info("demux_disabled", bpf_demux="disabled", reason="flag",
                    source=settings.demux_disabled_by)
        return DemuxOutcome(DemuxState.DISABLED, mode, reason=FallbackReason.FLAG)
    program = None
    try:
        preflight.check(settings)
        lender = previous.program if previous is not None and previous.routing else None
        program = load(settings, group, lender)
        if attach:
            program.attach(group.sockets[0])
        board = StatusBoard.from_map_fd(program.slots_fd, len(group.sockets))
    except Unavailable as exc:
        return _fallback(mode, exc.reason, exc.detail, exc.errno, program)
    except ShimError as exc:
        return _fallback(mode, classify(exc), describe(exc), exc.errno, program)
    except OSError as exc:  # a probe nobody expected: say which path and why
        where = f"{exc.filename}: " if exc.filename else ""
        return _fallback(mode, FallbackReason.PROBE_FAILED,
                         f"{where}{exc.strerror or exc!r}", exc.errno, program)
    except Exception as exc:  # an unexpected bcc failure must not stop boot either
        return _fallback(mode, FallbackReason.PROBE_FAILED, repr(exc), None, program)
    outcome = DemuxOutcome(DemuxState.ATTACHED if attach else DemuxState.PREPARED, mode,
                           program=program, board=board)
    if attach:
        _log_attached(outcome, settings)
    return outcome


def _fallback(mode: str, reason: FallbackReason, detail: str, errno: int | None,
              program: Program | None) -> DemuxOutcome:
    if program is not None:
        program.close()
    logger.warning("demux_fallback", bpf_demux="fallback", reason=str(reason), error=detail,
                   errno=errno, using="kernel reuseport hash")
    return DemuxOutcome(DemuxState.FALLBACK, mode, reason=reason, error=detail)


def _log_attached(outcome: DemuxOutcome, settings: Settings) -> None:
    assert outcome.program is not None
    program = outcome.program
    logger.info("demux_attached", bpf_demux="attached", fd=outcome.fd, prog_id=outcome.prog_id,
                mode=outcome.mode, workers=program.workers,
                stall_threshold_ms=settings.demux.stall_threshold_ms,
                # who re-homes a closing listener's queue: the program, or
                # (without it) the kernel's hash if net.ipv4.tcp_migrate_req=1
                migrate="select_or_migrate" if program.migrate else "none",
                object=program.origin,
                **({} if program.migrate else {"migrate_error": program.no_migrate_why}))


def swap(old: DemuxOutcome, new: DemuxOutcome, sock: socket.socket,
         settings: Settings) -> None:
    """Commit a reload's demux: put a prepared program in for the group's
    current one (one setsockopt: the kernel replaces it atomically), or
    detach when the new generation has none; then release the old one."""
    if new.state is DemuxState.PREPARED and new.program is not None:
        try:
            new.program.attach(sock)
        except ShimError as exc:
            new.program.close()
            fell = _fallback(new.mode, classify(exc), describe(exc), exc.errno, None)
            new.state, new.reason, new.error, new.program = (fell.state, fell.reason,
                                                             fell.error, None)
        else:
            new.state = DemuxState.ATTACHED
            _log_attached(new, settings)
    if not new.routing and old.routing:
        try:
            shim.detach(sock)
        except ShimError as exc:
            logger.warning("demux_detach_failed", error=describe(exc))
    old.close()
