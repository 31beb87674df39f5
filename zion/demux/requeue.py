"""Which blocked workers' accept queues the master moves to the others.

A worker whose event loop is inside a long synchronous call (an app that
blocks, a stop signal) accepts nothing until the call ends. The program stops
sending it connections once it looks blocked (bpf/zion_demux.c), but what it
was sent just before, or while every worker was blocked, waits in its
listener's accept queue behind a call of unknown length, while another worker
may be free. One shared accept queue would hand those connections to whoever
is free first; zion gets the same from the kernel (the move itself is
`zion.supervisor.generation.requeue`): shutdown(2) on a listening socket runs
inet_csk_listen_stop, which with a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE program
(Linux 5.14+) migrates each queued connection to the listener the program
picks for `migrating_sk`, and listen(2) on the same socket puts it back into
its reuseport group (reuseport_resurrect, net/core/sock_reuseport.c). The
worker keeps its socket and its epoll registration. A half-open connection
whose ACK comes after that stays (tcp_v4_rcv migrates a request only while
its listener is not listening): the next look moves it. While the queues
move, every blocked slot is DRAINING, so the program sends what migrates, and
new connections, to the workers that turn.

This module only decides, from the status board and the real accept queues,
and says when to look again: every BUSY_BEATS heartbeat intervals (10 ms)
while any worker has work in hand or took a connection since the last look,
at IDLE_POLL otherwise (an idle master must sleep). Each look is a wake-up
of the master, which costs tens of microseconds of CPU on a VM whatever the
loop does, and more in its loop (measured on the 2-CPU bench VM under a
new-connection load: about 140 us a wake-up, 100 a second, 1.4 % of a
core). So while every worker beats on time (its last beat at most two intervals
old, IDLE_BEATS + 1 for one without work in hand), the looks space out,
twice as far each time, up to CALM_PERIODS periods (40 ms); the first look
that finds a late beat or a blocked worker brings the 10 ms pace back. A
connection sent to a worker just before it blocked waits up to CALM_PERIODS
periods more before it moves, one period once the looks have found a late
beat. Under CPU contention beats come late and the looks stay fast.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zion.demux.board import BUSY_BEATS, IDLE_BEATS, SlotState, StatusBoard
from zion.listeners import accept_queue_len

_READY = int(SlotState.READY)
_U64 = (1 << 64) - 1
# With no connection anywhere nothing can wait behind a blocked worker; the
# first dispatch makes the board show work and the next poll is fast again.
IDLE_POLL = 0.1  # seconds
# Periods (BUSY_BEATS heartbeat intervals) between looks at most while every
# worker with work turns.
CALM_PERIODS = 4


@dataclass
class Look:
    """What a look found: the blocked slots whose queue should move now, and
    every slot it judged blocked (none of them is a place to move it to)."""

    move: list[int] = field(default_factory=list)
    blocked: list[int] = field(default_factory=list)


class QueueMover:
    """`interval`: the heartbeat interval (seconds). A worker that accepted a
    connection since the last look is turning, whatever its heartbeat says
    (under CPU contention timers run late; accepts do not lie). Otherwise one
    with requests or handshakes and no beat for BUSY_BEATS intervals is
    blocked (as the program's ZION_BUSY_NS). One without may sleep IDLE_BEATS
    intervals between beats, so its heartbeat says less: it is blocked when
    its queue was there at the last look and is still (a loop that turns
    takes its whole queue at every turn), or when it missed that beat too."""

    def __init__(self, interval: float,
                 queue_len: Callable[[socket.socket], int] = accept_queue_len) -> None:
        self.period = BUSY_BEATS * interval
        interval_ns = int(interval * 1e9)
        # A beat is late past its pace and one more interval (timers run late
        # in a loop that shares its CPU: under the bench's new-connection
        # load half the looks found a beat older than 1.5 intervals).
        self.late_ns = 2 * interval_ns
        self.idle_late_ns = (IDLE_BEATS + 1) * interval_ns
        # Periods until the next look while the workers turn: doubled after
        # each such look, up to CALM_PERIODS; 1 after any other.
        self.spacing = 1
        self.busy_ns = BUSY_BEATS * interval_ns
        self.idle_ns = IDLE_BEATS * interval_ns
        self.queue_len = queue_len
        self.next_at = 0.0
        # At the last look: each slot's `accepted`, and the slots without
        # work in hand whose queue was not empty.
        self.accepted: dict[int, int] = {}
        self.queued: set[int] = set()

    def poll(self, now: float, now_ns: int, board: StatusBoard,
             sockets: Sequence[socket.socket]) -> Look:
        """Slots whose queue should move now: READY, connections waiting in
        the accept queue, the loop not turning, while some other READY
        worker's loop turns (when every worker is blocked, moving the queue
        only trades one wait for another)."""
        self.next_at = now + IDLE_POLL
        look, turning = Look(), False
        busy, calm = False, True
        accepted_then, queued_then = self.accepted, self.queued
        self.accepted, self.queued = {}, set()
        read = board.read
        for index in range(min(board.count, len(sockets))):
            (heartbeat_ns, dispatches, accepted, dropped, state, _conns, inflight, _pid,
             _backlog, handshakes) = read(index)
            if state != _READY:
                continue
            self.accepted[index] = accepted
            # Slot.pending: sent and not accepted, as the program counts it.
            owed = (dispatches - accepted - dropped) & _U64
            pending = 0 if owed >> 63 else owed
            working = inflight or handshakes
            took = accepted_then.get(index, accepted) != accepted
            if took or working or pending:
                # Connections are arriving: a look that happened to find
                # every worker between two of them must not wait IDLE_POLL.
                busy = True
            age = now_ns - heartbeat_ns
            queued: int | None = None  # read once per look, and only if needed
            # Its beat is late (for its pace), even if it took connections
            # since the last look: it may be blocking now, look closely.
            calm = calm and age <= (self.late_ns if working else self.idle_late_ns)
            if took:
                blocked = False
            elif working:
                blocked = age > self.busy_ns
            else:
                blocked = age > self.idle_ns + self.busy_ns
                if not blocked and pending:
                    queued = self.queue_len(sockets[index])
                    if queued:
                        blocked = index in queued_then
                        self.queued.add(index)
                        calm = False
            if not blocked:
                turning = True
                continue
            calm = False
            look.blocked.append(index)
            if queued is None:
                queued = self.queue_len(sockets[index])
            if queued > 0:
                look.move.append(index)
        if not (busy and calm):
            self.spacing = 1
        if busy:
            self.next_at = now + self.period * self.spacing
            if calm:
                self.spacing = min(2 * self.spacing, CALM_PERIODS)
        return look if turning else Look()
