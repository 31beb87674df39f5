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

from zion.demux import preflight
from zion.demux.board import BUSY_BEATS, IDLE_BEATS, StatusBoard
from zion.demux.compile_helper import compile_and_fill
from zion.demux.program import MAX_WORKERS, program_text, source_path
from zion.demux.reasons import DemuxState, FallbackReason, Unavailable
from zion.demux.shim import ShimError, ShimOp, SkReuseport, attach, prog_id_of
from zion.listeners import ListenerGroup
from zion.log import get_logger
from zion.settings import Settings

logger = get_logger("zion.demux")


def classify(err: ShimError) -> FallbackReason:
    """The reason a shim failure is reported under."""
    if err.op is ShimOp.CREATE_SOCKARRAY:
        if err.errno == errno_mod.EPERM:
            return FallbackReason.NO_CAPABILITY
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


def text_for(settings: Settings, workers: int, sockarray_fd: int,
             migrate: bool = False) -> str:
    path = Path(settings.demux.program) if settings.demux.program else source_path()
    try:
        source = path.read_text()
    except OSError as exc:
        raise Unavailable(FallbackReason.PROBE_FAILED,
                          f"cannot read {path}: {exc.strerror}") from None
    demux = settings.demux
    beat_ns = demux.heartbeat_interval_ms * 1_000_000
    return program_text(source, workers, sockarray_fd, demux.mode,
                        demux.stall_threshold_ms * 1_000_000, BUSY_BEATS * beat_ns,
                        (IDLE_BEATS + BUSY_BEATS) * beat_ns, migrate)


def load(settings: Settings, group: ListenerGroup, kernel_source: str | None,
         lender: Program | None = None) -> Program:
    """Compile and load the program for `group` in the compile helper and fill
    its sockarray (slots a lender's array already holds keep their socket).
    Raises Unavailable or ShimError."""
    count = len(group.sockets)
    if not 1 <= count <= MAX_WORKERS:
        raise Unavailable(FallbackReason.PROBE_FAILED,
                          f"the demux supports 1..{MAX_WORKERS} workers")
    text_for(settings, count, -1)  # an unreadable source fails here, in the master
    done = compile_and_fill(lambda fd, m: text_for(settings, count, fd, m), kernel_source,
                            group.sockets, min(lender.workers, count) if lender else 0,
                            lender.sockarray_fd if lender else None, settings.demux.migrate)
    return Program(done.prog_fd, done.sockarray_fd, done.slots_fd, done.text, count,
                   done.migrate, done.no_migrate_why)


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
        kernel_source = preflight.check(settings)
        lender = previous.program if previous is not None and previous.routing else None
        program = load(settings, group, kernel_source, lender)
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
            SkReuseport.detach(sock)
        except ShimError as exc:
            logger.warning("demux_detach_failed", error=describe(exc))
    old.close()
