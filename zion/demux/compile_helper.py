"""bcc and LLVM live only in a short-lived helper process.

bcc compiles the program with LLVM; what loading needs afterwards is the
bytecode and where its map references are (zion/demux/objects.py), which
the master loads with bpf(2) itself. So the master forks a helper that
imports bcc, compiles, sends the object back over a Unix socket as JSON, and
exits. The master and its workers never map libbcc or LLVM (about 100 MiB of
the master's PSS when they stayed loaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from typing import Any, NoReturn

from zion.demux import objects, preflight
from zion.demux.objects import DemuxObject
from zion.demux.reasons import FallbackReason, Unavailable
from zion.demux.shim import ShimError, ShimOp
from zion.forking import fork_child

# Compiling takes about a second here; a helper silent for this long is stuck.
_TIMEOUT = 120.0


def compile_in_helper(source: str, mode: str, migrate: bool,
                      kernel_source: str | None) -> DemuxObject:
    """Run the helper; raise what it raised (Unavailable or ShimError)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = fork_child()  # the master's handlers undone in the helper
    if pid == 0:
        parent.close()
        _helper(child, source, mode, migrate, kernel_source)
    child.close()
    try:
        parent.settimeout(_TIMEOUT)
        try:
            data = parent.recv(16 << 20)
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
    if "object" not in reply:
        raise Unavailable(FallbackReason.PROBE_FAILED, reply.get("error", "no object"))
    return DemuxObject.from_json(reply["object"])


def _reap(pid: int) -> None:
    # ChildProcessError: the master's SIGCHLD reaping got there first.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _helper(conn: socket.socket, source: str, mode: str, migrate: bool,
            kernel_source: str | None) -> NoReturn:
    reply: dict[str, Any] = {}
    try:
        bcc = preflight.import_bcc()
        obj = objects.compile_object(bcc, source, mode, migrate, kernel_source)
        reply = {"object": obj.to_json()}
    except Unavailable as exc:
        reply = {"unavailable": [str(exc.reason), exc.detail, exc.errno]}
    except ShimError as exc:
        reply = {"shim": [str(exc.op), exc.errno, exc.log_tail, exc.detail]}
    except BaseException as exc:
        reply = {"error": repr(exc)}
    try:
        conn.send(json.dumps(reply).encode())
    finally:
        os._exit(0)
