"""bcc and LLVM live only in a short-lived helper process.

bcc compiles the program with LLVM at run time; once loaded, a program and
its maps are kernel objects that only need file descriptors. So the master
forks a helper that imports bcc, compiles and loads the program, creates or
reuses the sockarray and fills it with the group's listeners, sends the
program, sockarray and status-map descriptors back over a Unix socket
(SCM_RIGHTS), and exits. The master and its workers never map libbcc or
LLVM (about 100 MiB of the master's PSS when they stayed loaded).

The helper is a fork, so it already holds the listeners and any sockarray
being reused: only their numbers travel, and only descriptors come back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from zion.demux import preflight
from zion.demux.program import MAX_WORKERS
from zion.demux.reasons import FallbackReason, Unavailable
from zion.demux.shim import ReuseportSockArray, ShimError, ShimOp, SkReuseport

# Compiling takes about a second here; a helper silent for this long is stuck.
_TIMEOUT = 120.0


@dataclass(frozen=True)
class Compiled:
    prog_fd: int
    sockarray_fd: int
    slots_fd: int
    text: str
    migrate: bool  # loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
    no_migrate_why: str | None  # else what the kernel said


def compile_and_fill(make_text: Callable[[int, bool], str], kernel_source: str | None,
                     sockets: Sequence[socket.socket], start: int,
                     lender_sockarray_fd: int | None, want_migrate: bool = True) -> Compiled:
    """Run the helper; raise what it raised (Unavailable or ShimError).

    `make_text(sockarray_fd, migrate)` is the program text: the sockarray is
    referred to by its descriptor number in the process that loads the
    program, and `migrate` says whether it is loaded as SELECT_OR_MIGRATE."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        _helper(child, make_text, kernel_source, [s.fileno() for s in sockets], start,
                lender_sockarray_fd, want_migrate)
    child.close()
    try:
        parent.settimeout(_TIMEOUT)
        try:
            data, fds, _flags, _addr = socket.recv_fds(parent, 1 << 20, 3)
        except (TimeoutError, OSError) as exc:
            os.kill(pid, signal.SIGKILL)
            raise Unavailable(FallbackReason.PROBE_FAILED,
                              f"the compile helper did not answer: {exc}") from None
    finally:
        parent.close()
        _reap(pid)
    reply: dict[str, Any] = json.loads(data or b'{"error": "the compile helper died"}')
    if "shim" in reply:
        op, errno, tail, detail = reply["shim"]
        raise ShimError(ShimOp(op), errno, tail, detail)
    if "unavailable" in reply:
        reason, detail, errno = reply["unavailable"]
        raise Unavailable(FallbackReason(reason), detail, errno)
    if "error" in reply or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise Unavailable(FallbackReason.PROBE_FAILED, reply.get("error", "no descriptors"))
    return Compiled(fds[0], fds[1], fds[2], reply["text"], reply["migrate"],
                    reply["no_migrate_why"])


def _reap(pid: int) -> None:
    # ChildProcessError: the master's SIGCHLD reaping got there first.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _helper(conn: socket.socket, make_text: Callable[[int, bool], str],
            kernel_source: str | None,
            fds: list[int], start: int, lender_fd: int | None,
            want_migrate: bool) -> NoReturn:
    # Nothing of the master's may run here: its handlers would write into the
    # master's wake-up pipe.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    reply: dict[str, Any] = {}
    send: list[int] = []
    try:
        bcc = preflight.import_bcc()
        from bcc.libbcc import lib

        sockarray = (ReuseportSockArray(lib, lender_fd) if lender_fd is not None
                     else ReuseportSockArray.create(lib, MAX_WORKERS))
        prog, why = SkReuseport.load_migrating(bcc, lambda m: make_text(sockarray.fd, m),
                                               kernel_source, want_migrate)
        for index in range(start, len(fds)):
            sockarray.set(index, socket.socket(fileno=fds[index]))
        reply = {"text": prog.text, "migrate": prog.migrate, "no_migrate_why": why}
        send = [prog.fd, sockarray.fd, prog.slots_fd]
    except Unavailable as exc:
        reply = {"unavailable": [str(exc.reason), exc.detail, exc.errno]}
    except ShimError as exc:
        reply = {"shim": [str(exc.op), exc.errno, exc.log_tail, exc.detail]}
    except BaseException as exc:
        reply = {"error": repr(exc)}
    try:
        socket.send_fds(conn, [json.dumps(reply).encode()], send)
    finally:
        os._exit(0)
