"""The typed shim and the program's choice on the real kernel, without a
server: a reuseport group of plain listening sockets, the program attached,
synthetic loads written into the status board the program reads."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import pytest
import structlog

from tests.conftest import wait_for
from tests.support.bpf import cannot_load_bpf
from zion.demux import policy
from zion.demux.board import SlotState
from zion.demux.reasons import DemuxState, FallbackReason
from zion.demux.shim import ShimError, ShimOp
from zion.listeners import ListenerGroup, accept_queue_len
from zion.settings import load_settings

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))


def _settings(state_dir, **demux):
    return load_settings(None, {"server": {"workers": 3}, "tls": {"state_dir": str(state_dir)},
                                "demux": demux}, {})


def _group(count: int) -> ListenerGroup:
    socks, port = [], 0
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(256)
        port = sock.getsockname()[1]
        socks.append(sock)
    return ListenerGroup(tuple(socks), "127.0.0.1", port, socket.AF_INET)


def _landing(group: ListenerGroup, connections: int) -> list[int]:
    """Open `connections` TCP connections (each from a new source port, so a
    new hash) and return how many each listener's accept queue got."""
    clients = []
    for _ in range(connections):
        clients.append(socket.create_connection(("127.0.0.1", group.port)))
    deadline = time.monotonic() + 5
    while sum(accept_queue_len(s) for s in group.sockets) < connections:
        assert time.monotonic() < deadline, "connections never reached the accept queues"
    counts = [accept_queue_len(s) for s in group.sockets]
    for client in clients:
        client.close()
    return counts


@contextmanager
def _attached(state_dir, count: int = 3, **demux):
    """A plain reuseport group of `count` listeners with the program attached;
    yields the settings, the group and the outcome, and releases all. A long
    stall threshold and a 1 s heartbeat interval: a heartbeat written once
    stays fresh (an idle worker's pace is 4 + 2 intervals), and the ages the
    tests write stay on their side of each mark, however long a loaded
    machine takes to open the connections (at the 5 ms default, 20 ms of
    delay moved an idle worker past its pace: 2 failures at load 7)."""
    demux.setdefault("heartbeat_interval_ms", 1000)
    settings = _settings(state_dir, stall_threshold_ms=60_000, **demux)
    group = _group(count)
    outcome = policy.setup(settings, group)
    try:
        yield settings, group, outcome
    finally:
        outcome.close()
        group.close()


def _ready(board, loads: list[int]) -> None:
    for index, load in enumerate(loads):
        board.set_state(index, SlotState.READY, pid=1000 + index)
        board.slots[index].heartbeat_ns = time.monotonic_ns()
        board.slots[index].conns = load


@pytest.mark.parametrize("mode", ["least-loaded", "hash"])
def test_the_program_weighs_load_in_least_loaded_and_not_in_hash(state_dir, mode):
    with _attached(state_dir, mode=mode) as (_, group, outcome):
        assert outcome.state is DemuxState.ATTACHED and outcome.board is not None
        _ready(outcome.board, [500, 0, 0])  # worker 0 is far busier than the others
        counts = _landing(group, 60)
    if mode == "least-loaded":
        # two hashed choices, the less loaded wins: the busy worker never does
        assert counts[0] == 0 and counts[1] + counts[2] == 60, counts
    else:
        assert counts[0] > 5, counts  # the hash ignores load: worker 0 keeps its share


def test_least_loaded_avoids_a_stale_heartbeat(state_dir):
    with _attached(state_dir, mode="least-loaded") as (_, group, outcome):
        assert outcome.board is not None
        _ready(outcome.board, [0, 0, 0])
        outcome.board.slots[1].heartbeat_ns = 1  # a worker that stopped beating long ago
        counts = _landing(group, 60)
    assert counts[1] == 0 and sum(counts) == 60, counts


def test_an_old_heartbeat_is_blocked_only_in_a_worker_with_work(state_dir):
    # An idle worker beats every four intervals, so its heartbeat may be older
    # than the two intervals that mark a busy worker as blocked: with nothing
    # in hand it is not blocked, and gets its share by load.
    with _attached(state_dir, mode="least-loaded") as (settings, group, outcome):
        assert outcome.board is not None
        _ready(outcome.board, [0, 1, 1])
        busy_ns = 2 * settings.demux.heartbeat_interval_ms * 1_000_000
        outcome.board.slots[0].heartbeat_ns = time.monotonic_ns() - 2 * busy_ns
        counts = _landing(group, 30)
    assert counts[0] >= 5 and sum(counts) == 30, counts


def test_a_worker_without_work_past_its_idle_pace_is_blocked(state_dir):
    # No beat for longer than the idle pace allows (four intervals, plus
    # two): frozen with nothing in hand, it is passed over at once, not only
    # at the stall threshold.
    with _attached(state_dir, mode="least-loaded") as (settings, group, outcome):
        assert outcome.board is not None
        _ready(outcome.board, [0, 3, 3])
        idle_ns = 6 * settings.demux.heartbeat_interval_ms * 1_000_000
        outcome.board.slots[0].heartbeat_ns = time.monotonic_ns() - idle_ns - 10_000_000
        counts = _landing(group, 30)
    assert counts[0] == 0 and sum(counts) == 30, counts


def test_a_migrating_connection_goes_to_a_ready_slot_not_a_draining_one(state_dir):
    # What the master relies on while it moves blocked queues: the slots it
    # marks DRAINING (the source, and every other blocked one) get nothing,
    # even when they look the best choice (here: idle).
    with _attached(state_dir, mode="least-loaded") as (_, group, outcome):
        board = outcome.board
        assert board is not None and outcome.migrates
        _ready(board, [0, 9, 9])
        clients = [socket.create_connection(("127.0.0.1", group.port)) for _ in range(3)]
        wait_for(lambda: accept_queue_len(group.sockets[0]) == 3, 5, "queued on slot 0")
        _ready(board, [0, 0, 9])
        board.set_state(0, SlotState.DRAINING)
        board.set_state(1, SlotState.DRAINING)  # blocked too, and idle-looking
        fallbacks = board.fallbacks
        group.sockets[0].shutdown(socket.SHUT_RDWR)
        queues = [accept_queue_len(s) for s in group.sockets]
        assert queues == [0, 0, 3] and board.fallbacks == fallbacks, queues
        for c in clients:
            c.close()


def test_attach_to_socket_outside_a_reuseport_group(state_dir):
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    settings = _settings(state_dir)
    group = _group(1)
    program = policy.load(settings, group)
    try:
        with pytest.raises(ShimError) as info:
            program.attach(plain)
        assert info.value.op is ShimOp.ATTACH
        assert "not in a SO_REUSEPORT group" in info.value.detail
        assert policy.classify(info.value) is FallbackReason.ATTACH_FAILED
    finally:
        program.close()
        group.close()
    # The boot wiring turns the same failure into a fallback, not an exception.
    plain_group = ListenerGroup((plain,), "127.0.0.1", plain.getsockname()[1], socket.AF_INET)
    with structlog.testing.capture_logs() as logs:
        outcome = policy.setup(settings, plain_group)
    plain.close()
    assert outcome.state is DemuxState.FALLBACK
    assert outcome.reason is FallbackReason.ATTACH_FAILED
    assert logs[-1]["bpf_demux"] == "fallback" and logs[-1]["log_level"] == "warning"


def test_compiler_output_is_classified_in_one_place():
    assert policy.classify(ShimError(ShimOp.COMPILE, None, "fatal error: 'linux/bpf.h' file "
                                     "not found")) is FallbackReason.NO_KERNEL_HEADERS
    assert policy.classify(ShimError(ShimOp.COMPILE, None, "error: use of undeclared "
                                     "identifier")) is FallbackReason.COMPILE_FAILED
    assert policy.classify(ShimError(ShimOp.LOAD, 1, "")) is FallbackReason.NO_CAPABILITY
    assert policy.classify(ShimError(ShimOp.LOAD, None, "R1 invalid mem access")
                           ) is FallbackReason.VERIFIER_REJECTED
    assert policy.classify(ShimError(ShimOp.CREATE_SOCKARRAY, 22, "")
                           ) is FallbackReason.KERNEL_UNSUPPORTED
    # the first bpf() call, CAP_BPF effective (preflight): a filter refused it
    assert policy.classify(ShimError(ShimOp.CREATE_SOCKARRAY, 1, "")
                           ) is FallbackReason.BPF_SYSCALL_REFUSED


def test_a_closing_listeners_queue_goes_where_the_program_says(state_dir):
    # Loaded as SELECT_OR_MIGRATE, the program picks the new home of each
    # connection queued on a listener that stops listening: the least-loaded
    # healthy worker, even in hash mode (where new connections follow the
    # hash), and a busy one gets none.
    with _attached(state_dir, mode="hash") as (_, group, outcome):
        assert outcome.state is DemuxState.ATTACHED and outcome.board is not None
        assert outcome.migrates
        board = outcome.board
        _ready(board, [0, 0, 0])
        for index in (1, 2):
            board.set_state(index, SlotState.STARTING)  # only slot 0 takes new connections
        clients = [socket.create_connection(("127.0.0.1", group.port)) for _ in range(12)]
        wait_for(lambda: accept_queue_len(group.sockets[0]) == 12, 5, "12 queued on slot 0")
        _ready(board, [0, 500, 0])  # slot 1 is far busier than slot 2
        board.set_state(0, SlotState.DRAINING)
        group.sockets[0].shutdown(socket.SHUT_RDWR)
        wait_for(lambda: accept_queue_len(group.sockets[2]) == 12, 5, "12 moved to slot 2")
        assert accept_queue_len(group.sockets[1]) == 0
        for client in clients:
            client.close()
