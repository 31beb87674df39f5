"""The QUIC steering program: its text and -D contract, loading it in the
compile helper process, and the loaded program as descriptors. No policy
(zion/quic/policy.py decides what a failure means).

bpf/zion_quic.c is the source. Like the TCP demux (zion/demux/), bcc and
LLVM run only in a short-lived forked helper: it compiles and loads the
program, creates the UDP group's sockarray and fills it, and sends the
program's and maps' descriptors back over a Unix socket (SCM_RIGHTS). The
master keeps descriptors only; it writes the current generation and reads
the counters with bpf(2) itself (zion/quic/bpfmap.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from zion.demux import preflight
from zion.demux.reasons import FallbackReason, Unavailable
from zion.demux.shim import (
    BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
    BPF_PROG_TYPE_SK_REUSEPORT,
    ShimError,
    ShimOp,
    attach,
    compile_program,
    map_create,
    prog_id_of,
    prog_load,
    sockarray_set,
)
from zion.forking import fork_child
from zion.quic import bpfmap, cid

# Entries of the Initial DCID map: a handshake's Initials arrive within a
# round trip of each other, so only a flood of this many new DCIDs inside
# one round trip could evict a pinned one (its handshake then restarts).
INITIALS = 65536
_BPF_MAP_TYPE_ARRAY = 2
_TIMEOUT = 120.0  # a compile helper silent this long is stuck


class QuicStat(IntEnum):
    """zion_quic_stats indices (ZION_QUIC_STAT_* in bpf/zion_quic.c)."""

    BY_CID = 0
    INITIAL_NEW = 1
    INITIAL_SEEN = 2
    PASS = 3
    NO_SOCKET = 4
    NO_WORKER = 5


def source_path() -> Path:
    return Path(str(resources.files("zion") / "_data" / "zion_quic.c"))


def program_text(source: str, workers: int, sockarray_fd: int, slots_fd: int | None,
                 stall_ns: int, gen_fd: int = -1, stats_fd: int = -1,
                 initials: int = INITIALS) -> str:
    if not 1 <= workers <= cid.MAX_SLOTS:
        raise ValueError(f"QUIC steering supports 1..{cid.MAX_SLOTS} workers")
    return (
        "/* parameters set by zion/quic/steering.py */\n"
        f"#define ZION_QUIC_WORKERS {workers}\n"
        f"#define ZION_SOCKARRAY_FD {sockarray_fd}\n"
        f"#define ZION_SLOTS_FD {-1 if slots_fd is None else slots_fd}\n"
        f"#define ZION_GEN_FD {gen_fd}\n"
        f"#define ZION_STATS_FD {stats_fd}\n"
        f"#define ZION_STALL_NS {stall_ns}ULL\n"
        f"#define ZION_CID_LEN {cid.CID_LENGTH}\n"
        f"#define ZION_CID_CONFIG {cid.CONFIG}\n"
        f"#define ZION_QUIC_RING {cid.RING}\n"
        f"#define ZION_QUIC_INITIALS {initials}\n"
        '#line 1 "zion_quic.c"\n'
        f"{source}"
    )


@dataclass
class QuicProgram:
    """A loaded steering program as descriptors: the program, the group's
    sockarray, the current-generation map and the counters."""

    prog_fd: int
    sockarray_fd: int
    gen_fd: int
    stats_fd: int
    text: str
    workers: int

    @property
    def prog_id(self) -> int | None:
        return prog_id_of(self.prog_fd)

    @property
    def master_fds(self) -> tuple[int, ...]:
        """Descriptors workers must not keep."""
        return (self.prog_fd, self.sockarray_fd, self.gen_fd, self.stats_fd)

    def attach(self, sock: socket.socket) -> None:
        """Attach to the UDP reuseport group `sock` belongs to."""
        attach(self.prog_fd, sock)

    def set_socket(self, slot: int, generation: int, sock: socket.socket) -> None:
        """The socket that receives the CIDs of `slot` in `generation`."""
        sockarray_set(self.sockarray_fd, cid.socket_index(slot, generation), sock)

    def set_generation(self, generation: int) -> None:
        """New connections (first Initials) go to this generation's sockets."""
        try:
            bpfmap.update_u32(self.gen_fd, 0, generation)
        except bpfmap.MapError as exc:
            raise ShimError(ShimOp.SET, exc.errno, "", str(exc)) from None

    def stats(self) -> dict[str, int]:
        return {stat.name.lower(): bpfmap.lookup_u64(self.stats_fd, stat) for stat in QuicStat}

    def close(self) -> None:
        for fd in self.master_fds:
            if fd >= 0:
                os.close(fd)
        self.prog_fd = self.sockarray_fd = self.gen_fd = self.stats_fd = -1


def load(source: str, sockets: Sequence[socket.socket], generation: int,
         slots_fd: int | None, stall_ns: int, kernel_source: str | None,
         maps_of: QuicProgram | None = None) -> QuicProgram:
    """Compile and load the program in the helper, create the sockarray with
    sockets[i] as slot i of `generation`, and make that generation current.
    With `maps_of` (a reload that changes the worker count, which the
    program is compiled for): the new program uses that program's
    sockarray, generation and counters maps instead of new ones, so the
    CIDs of older generations stay routable once it replaces it; it is not
    attached and `generation` is not made current (QuicGroup.commit does
    both). Raises Unavailable or ShimError."""
    workers = len(sockets)
    program_text(source, workers, -1, slots_fd, stall_ns)  # a bad count fails here
    shared = None if maps_of is None else (maps_of.sockarray_fd, maps_of.gen_fd,
                                           maps_of.stats_fd)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = fork_child()  # the master's handlers undone in the helper
    if pid == 0:
        parent.close()
        _helper(child, source, [s.fileno() for s in sockets], generation, slots_fd, stall_ns,
                kernel_source, shared)
    child.close()
    try:
        parent.settimeout(_TIMEOUT)
        try:
            data, fds, _flags, _addr = socket.recv_fds(parent, 1 << 20, 4)
        except (TimeoutError, OSError) as exc:
            os.kill(pid, signal.SIGKILL)
            raise Unavailable(FallbackReason.PROBE_FAILED,
                              f"the compile helper did not answer: {exc}") from None
    finally:
        parent.close()
        with contextlib.suppress(ChildProcessError):  # the master's reaper got it
            os.waitpid(pid, 0)
    reply: dict[str, Any] = json.loads(data or b'{"error": "the compile helper died"}')
    if "shim" in reply or "unavailable" in reply or "error" in reply or len(fds) != 4:
        for fd in fds:
            os.close(fd)
    if "shim" in reply:
        op, errno, tail, detail = reply["shim"]
        raise ShimError(ShimOp(op), errno, tail, detail)
    if "unavailable" in reply:
        reason, detail, errno = reply["unavailable"]
        raise Unavailable(FallbackReason(reason), detail, errno)
    if "error" in reply or len(fds) != 4:
        raise Unavailable(FallbackReason.PROBE_FAILED, reply.get("error", "no descriptors"))
    # With maps_of, fds[1:] are this master's own descriptors of the shared
    # maps (SCM_RIGHTS made new ones): each program closes its own.
    program = QuicProgram(fds[0], fds[1], fds[2], fds[3], reply["text"], workers)
    if maps_of is not None:
        return program
    try:
        program.set_generation(generation)
    except ShimError:
        program.close()
        raise
    return program


def _helper(conn: socket.socket, source: str, fds: list[int], generation: int,
            slots_fd: int | None, stall_ns: int, kernel_source: str | None,
            shared: tuple[int, int, int] | None) -> NoReturn:
    reply: dict[str, Any] = {}
    send: list[int] = []
    try:
        bcc = preflight.import_bcc()
        # Maps the master reads and writes by descriptor are created here
        # with bpf(2) and referenced as pseudo fds (bcc cannot declare a
        # sockarray at all); the LRU and scratch maps are bcc's, kept alive
        # by the loaded program.
        if shared is not None:  # inherited from the master by fork
            sockarray_fd, gen_fd, stats_fd = shared
        else:
            sockarray_fd = map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8,
                                      cid.SOCKARRAY_ENTRIES, name="zion_quic_socks")
            gen_fd = map_create(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, name="zion_quic_gen")
            stats_fd = map_create(_BPF_MAP_TYPE_ARRAY, 4, 8, len(QuicStat),
                                  name="zion_quic_stats")
        text = program_text(source, len(fds), sockarray_fd, slots_fd, stall_ns, gen_fd,
                            stats_fd)
        compiled = compile_program(bcc, text, kernel_source,
                                   func=b"zion_quic")
        try:
            prog_fd = prog_load(BPF_PROG_TYPE_SK_REUSEPORT, compiled.insns, compiled.license,
                                "zion_quic")
        finally:
            compiled.close()
        for slot, fd in enumerate(fds):
            sock = socket.socket(fileno=fd)
            try:
                sockarray_set(sockarray_fd, cid.socket_index(slot, generation), sock)
            finally:
                sock.detach()
        reply = {"text": text}
        send = [prog_fd, sockarray_fd, gen_fd, stats_fd]
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
