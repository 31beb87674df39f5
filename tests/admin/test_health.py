"""The host's health signal: pure functions, no processes."""

from __future__ import annotations

from zion.admin.health import (
    Phase,
    StallWatch,
    WorkerHealth,
    WorkerState,
    agent_line,
    capacity,
    readiness,
    weight_percent,
)

MAX = 1000


def worker(index: int = 0, state: WorkerState = WorkerState.READY, conns: int = 0,
           inflight: int = 0, queue: int = 0) -> WorkerHealth:
    return WorkerHealth(index, 100 + index, state, 5.0, conns, inflight, queue)


def test_idle_healthy_host_weighs_100() -> None:
    assert weight_percent([worker(0), worker(1)], MAX) == 100
    assert agent_line(Phase.SERVING, [worker(0), worker(1)], MAX) == "up ready 100%\n"


def test_each_unhealthy_worker_takes_its_share() -> None:
    for bad in (WorkerState.STALLED, WorkerState.EMPTY, WorkerState.DRAINING,
                WorkerState.STARTING):
        assert weight_percent([worker(0), worker(1, bad)], MAX) == 50
        assert weight_percent([worker(0), worker(1, bad), worker(2, bad), worker(3, bad)],
                              MAX) == 25


def test_weight_falls_with_load() -> None:
    weights = [weight_percent([worker(0, inflight=n), worker(1, inflight=n)], MAX)
               for n in (0, 1, 4, 8, 32)]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == len(weights)
    assert weights[3] == 50  # QUEUE_KNEE requests busy: half
    # The accept queue counts like requests in flight; open connections by
    # how close they bring the worker to max_connections.
    assert capacity(worker(queue=8), MAX) == capacity(worker(inflight=8), MAX) == 0.5
    assert capacity(worker(conns=500), MAX) == 0.5
    assert capacity(worker(conns=MAX), MAX) == 0.0


def test_a_healthy_host_never_weighs_zero() -> None:
    # 0% would stop HAProxy sending anything to a host that still serves.
    assert weight_percent([worker(0, conns=MAX - 1, inflight=10_000)], MAX) == 1
    assert agent_line(Phase.SERVING, [worker(0, conns=MAX)], MAX) == "up ready 1%\n"


def test_no_healthy_worker_is_down_with_a_reason_haproxy_reads() -> None:
    workers = [worker(0, WorkerState.STALLED), worker(1, WorkerState.EMPTY)]
    line = agent_line(Phase.SERVING, workers, MAX)
    assert line == "down #no healthy worker\n"
    # HAProxy starts a reason only at a "#" after a space, tab or comma.
    assert " #" in line
    assert weight_percent(workers, MAX) == 0
    assert agent_line(Phase.STARTING, [], MAX) == "down #no healthy worker\n"


def test_stopping_and_reloading_drain() -> None:
    for phase in (Phase.STOPPING, Phase.RELOADING):
        assert agent_line(phase, [worker(0)], MAX) == "drain\n"


def test_readiness() -> None:
    assert readiness(Phase.SERVING, [worker(0)]) == (True, "serving")
    assert readiness(Phase.RELOADING, [worker(0)]) == (True, "serving")
    assert readiness(Phase.STOPPING, [worker(0)]) == (False, "stopping")
    assert readiness(Phase.STARTING, [worker(0)]) == (False, "starting")
    assert readiness(Phase.SERVING, [worker(0, WorkerState.STALLED)]) == (
        False, "no healthy worker")


def test_stall_watch_counts_each_stall_once() -> None:
    watch = StallWatch()
    assert watch.observe([worker(0), worker(1)]) == []
    assert watch.observe([worker(0, WorkerState.STALLED), worker(1)]) == [0]
    assert watch.observe([worker(0, WorkerState.STALLED), worker(1)]) == []
    assert watch.observe([worker(0), worker(1, WorkerState.STALLED)]) == [1]
    assert watch.observe([worker(0, WorkerState.STALLED), worker(1)]) == [0]


def test_a_shedding_worker_has_no_room_and_all_shedding_is_not_ready() -> None:
    # --limit-concurrency 4: a worker with 4 connections, or 4 in flight, sheds.
    assert capacity(worker(0, conns=4), MAX, concurrency=4) == 0.0
    assert capacity(worker(0, inflight=4), MAX, concurrency=4) == 0.0
    assert 0 < capacity(worker(0, conns=2), MAX, concurrency=4) < capacity(worker(0), MAX, 4)
    one = [worker(0, conns=4), worker(1)]
    assert readiness(Phase.SERVING, one, concurrency=4) == (True, "serving")
    assert weight_percent(one, MAX, concurrency=4) == 50
    both = [worker(0, conns=4), worker(1, inflight=9)]
    ready, why = readiness(Phase.SERVING, both, concurrency=4)
    assert not ready and "concurrency limit" in why
    assert agent_line(Phase.SERVING, both, MAX, concurrency=4) == "up ready 1%\n"
    # Off (0): the same load is nothing to shed.
    assert readiness(Phase.SERVING, both) == (True, "serving")
