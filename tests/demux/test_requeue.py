"""The master's choice of blocked workers whose accept queue it moves: the
board and the accept queues as the master reads them, without a kernel."""

from __future__ import annotations

import socket

import pytest

from zion.demux.board import SlotState, StatusBoard
from zion.demux.requeue import IDLE_POLL, QueueMover

INTERVAL = 0.005  # seconds: the default heartbeat interval
MS = 1_000_000
NOW_NS = 10_000 * MS


class _Queues:
    """accept_queue_len, per fake socket."""

    def __init__(self, lengths: list[int]) -> None:
        self.socks = [socket.socket() for _ in lengths]
        self.lengths = dict(zip(self.socks, lengths, strict=True))

    def __call__(self, sock: socket.socket) -> int:
        return self.lengths[sock]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def board():
    return StatusBoard.anonymous(3)


def _worker(board: StatusBoard, index: int, age_ms: float, conns: int = 0,
            inflight: int = 0, pending: int = 0, handshakes: int = 0,
            state: SlotState = SlotState.READY) -> None:
    slot = board.slots[index]
    slot.state = state
    slot.heartbeat_ns = NOW_NS - int(age_ms * MS)
    slot.conns, slot.inflight, slot.handshakes = conns + handshakes, inflight, handshakes
    slot.dispatches, slot.accepted, slot.dropped = pending, 0, 0


def _poll(board: StatusBoard, queues: list[int]) -> tuple[list[int], QueueMover]:
    q = _Queues(queues)
    try:
        mover = QueueMover(INTERVAL, queue_len=q)
        return mover.poll(100.0, NOW_NS, board, q.socks).move, mover
    finally:
        q.close()


def test_a_blocked_worker_with_a_queue_loses_it_when_another_turns(board):
    _worker(board, 0, age_ms=50, inflight=1, pending=2)  # inside a long call
    _worker(board, 1, age_ms=1, inflight=3)              # busy but turning
    _worker(board, 2, age_ms=12)                         # idle, slow beats
    moved, mover = _poll(board, [2, 0, 0])
    assert moved == [0]
    q = _Queues([2, 0, 0])
    try:
        # Judged blocked, queue or not: the master marks them DRAINING while
        # queues move, so nothing migrates to them.
        _worker(board, 2, age_ms=50, inflight=1)
        assert QueueMover(INTERVAL, queue_len=q).poll(100.0, NOW_NS, board, q.socks).blocked \
            == [0, 2]
    finally:
        q.close()
    assert mover.next_at == pytest.approx(100.0 + 2 * INTERVAL)


def test_nothing_moves_while_every_worker_is_blocked(board):
    # Moving would only trade one wait for another (a shared queue, too,
    # waits for the first worker to come free).
    for index in range(3):
        _worker(board, index, age_ms=50 + index, inflight=1, pending=1)
    assert _poll(board, [1, 1, 1])[0] == []


def test_a_blocked_worker_with_nothing_queued_keeps_its_listener(board):
    _worker(board, 0, age_ms=50, inflight=1)
    _worker(board, 1, age_ms=1)
    _worker(board, 2, age_ms=1)
    assert _poll(board, [0, 0, 0])[0] == []


def test_a_worker_that_was_idle_gets_its_idle_beat_before_its_queue_moves(board):
    # It beat every four intervals (20 ms) while idle and may not have woken
    # yet for the connection just queued: 25 ms is not blocked, 35 ms is.
    _worker(board, 0, age_ms=25, pending=1)
    _worker(board, 1, age_ms=1)
    assert _poll(board, [1, 0, 0])[0] == []
    _worker(board, 0, age_ms=35, pending=1)
    assert _poll(board, [1, 0, 0])[0] == [0]


def test_a_worker_with_a_handshake_is_blocked_after_two_intervals(board):
    _worker(board, 0, age_ms=9, handshakes=1, pending=1)
    _worker(board, 1, age_ms=1)
    assert _poll(board, [1, 0, 0])[0] == []
    _worker(board, 0, age_ms=11, handshakes=1, pending=1)
    assert _poll(board, [1, 0, 0])[0] == [0]


def test_idle_keepalive_connections_are_no_work(board):
    # A worker holding only idle keep-alive connections beats at the idle
    # pace, so its heartbeat may be 20 ms old without its loop being blocked.
    _worker(board, 0, age_ms=25, conns=40, pending=1)
    _worker(board, 1, age_ms=1)
    assert _poll(board, [1, 0, 0])[0] == []
    _worker(board, 0, age_ms=35, conns=40, pending=1)
    assert _poll(board, [1, 0, 0])[0] == [0]


@pytest.mark.parametrize("state", [SlotState.STARTING, SlotState.DRAINING, SlotState.EMPTY])
def test_only_ready_workers_count(board, state):
    # A draining worker's listener is being retired (its queue is handled
    # there), an empty slot's is replaced: neither is moved here, nor is a
    # starting worker a place for a queue to go.
    _worker(board, 0, age_ms=50, inflight=1, pending=1, state=state)
    _worker(board, 1, age_ms=1)
    assert _poll(board, [1, 0, 0])[0] == []
    _worker(board, 0, age_ms=50, inflight=1, pending=1)
    _worker(board, 1, age_ms=1, state=state)
    _worker(board, 2, age_ms=50, inflight=1, state=state)
    assert _poll(board, [1, 0, 0])[0] == []


def test_an_idle_host_is_polled_slowly(board):
    # Idle keep-alive connections included: nothing waits behind them.
    for index in range(3):
        _worker(board, index, age_ms=15, conns=10)
    moved, mover = _poll(board, [0, 0, 0])
    assert moved == [] and mover.next_at == pytest.approx(100.0 + IDLE_POLL)


def test_an_idle_worker_that_takes_nothing_for_a_whole_look_is_blocked(board):
    # Its heartbeat is young enough for the idle pace, but a loop that turns
    # takes its whole queue at every turn: a queue still there at the next
    # look, with nothing accepted since, means the loop has stopped.
    _worker(board, 0, age_ms=12, pending=1)
    _worker(board, 1, age_ms=1)
    q = _Queues([1, 0, 0])
    try:
        mover = QueueMover(INTERVAL, queue_len=q)
        assert mover.poll(100.0, NOW_NS, board, q.socks).move == []
        board.slots[0].dispatches += 1  # another one sent: still none taken
        assert mover.poll(100.01, NOW_NS, board, q.socks).move == [0]
        # One that accepted in between is turning, however slowly.
        mover = QueueMover(INTERVAL, queue_len=q)
        assert mover.poll(100.0, NOW_NS, board, q.socks).move == []
        board.slots[0].accepted += 1
        assert mover.poll(100.01, NOW_NS, board, q.socks).move == []
        # And a queue that emptied in between starts the watch again.
        q.lengths[q.socks[0]] = 0
        assert mover.poll(100.02, NOW_NS, board, q.socks).move == []
        q.lengths[q.socks[0]] = 1
        assert mover.poll(100.03, NOW_NS, board, q.socks).move == []
    finally:
        q.close()


def test_a_worker_that_accepted_since_the_last_look_is_turning_whatever_its_heartbeat(board):
    # Under CPU contention heartbeat timers run late and every worker can
    # look blocked; one that took connections since the last look turns.
    _worker(board, 0, age_ms=50, inflight=1, pending=2)
    _worker(board, 1, age_ms=15, inflight=1)
    _worker(board, 2, age_ms=15, inflight=1)
    q = _Queues([2, 0, 0])
    try:
        mover = QueueMover(INTERVAL, queue_len=q)
        assert mover.poll(100.0, NOW_NS, board, q.socks).move == []  # all look blocked
        board.slots[1].accepted += 1
        assert mover.poll(100.01, NOW_NS, board, q.socks).move == [0]
        # Worker 0 itself took one since: not blocked, its queue stays.
        board.slots[0].accepted += 1
        board.slots[1].accepted += 1
        assert mover.poll(100.02, NOW_NS, board, q.socks).move == []
    finally:
        q.close()


def test_traffic_keeps_the_looks_fast_even_between_connections(board):
    # A look that finds every worker between two connections (nothing in
    # hand) must not wait IDLE_POLL while connections keep arriving.
    for index in range(3):
        _worker(board, index, age_ms=1)
    q = _Queues([0, 0, 0])
    try:
        mover = QueueMover(INTERVAL, queue_len=q)
        mover.poll(100.0, NOW_NS, board, q.socks)
        assert mover.next_at == pytest.approx(100.0 + IDLE_POLL)
        board.slots[2].accepted += 1
        mover.poll(100.1, NOW_NS, board, q.socks)
        assert mover.next_at == pytest.approx(100.1 + 2 * INTERVAL)
    finally:
        q.close()


def test_looks_space_out_while_every_beat_is_on_time_and_close_in_at_a_late_one(board):
    # Each look is a wake-up of the master: while connections arrive and
    # every worker beats on time they come 10, 20, then every 40 ms; a late
    # beat (not yet a blocked worker) brings the 10 ms pace back at once.
    on_time = {0: {"age_ms": 1, "inflight": 1},
               1: {"age_ms": 3},  # no work in hand: beats at the idle pace
               2: {"age_ms": 2, "handshakes": 1}}
    # Late, and not (yet) blocked: one with work that took a connection since
    # the last look but has not beaten for over two intervals; one without
    # work past its idle pace (20 ms) and an interval.
    late = [(0, {"age_ms": 12, "inflight": 1}), (1, {"age_ms": 27})]
    q = _Queues([0, 0, 0])
    try:
        mover = QueueMover(INTERVAL, queue_len=q)
        now = 100.0

        def look() -> float:
            nonlocal now
            board.slots[2].accepted += 1  # connections keep arriving
            assert mover.poll(now, NOW_NS, board, q.socks).move == []
            gap, now = round(mover.next_at - now, 3), mover.next_at
            return gap

        for index, worker in on_time.items():
            _worker(board, index, **worker)
        assert [look() for _ in range(5)] == [0.01, 0.02, 0.04, 0.04, 0.04]
        for index, worker in late:
            _worker(board, index, **worker)
            mover.accepted[index] = -1  # it took connections since the last look
            assert look() == 0.01
            _worker(board, index, **on_time[index])
            assert [look() for _ in range(3)] == [0.01, 0.02, 0.04]
    finally:
        q.close()
