"""Retiring listeners: a worker is stopped only once its queue is empty."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from zion.supervisor.pool import WorkerHandle
from zion.supervisor.retiring import Retiring


@contextlib.contextmanager
def _retiring(queues: dict[int, int]) -> Iterator[tuple[Retiring, list[WorkerHandle]]]:
    retiring = Retiring(queue_len=lambda sock: queues[sock.fileno()])
    try:
        handles = []
        for index in range(2):
            sock = socket.socket()
            queues[sock.fileno()] = 3
            handle = WorkerHandle(index, 1000 + index, 0, -1, 0.0)
            retiring.add(handle, sock, deadline=100.0)
            handles.append(handle)
        yield retiring, handles
    finally:
        retiring.close_all()


def test_a_listener_with_queued_connections_keeps_its_worker():
    queues: dict[int, int] = {}
    with _retiring(queues) as (retiring, handles):
        assert retiring.to_stop(routed=True, now=1.0) == []
        first = retiring.items[0].sock.fileno()
        queues[first] = 0
        assert retiring.to_stop(routed=True, now=1.0) == [handles[0]]
        assert retiring.to_stop(routed=True, now=1.0) == []  # each worker is stopped once
        assert retiring.to_stop(routed=True, now=100.5) == [handles[1]]  # the deadline


def test_without_the_program_workers_stop_at_once():
    with _retiring({}) as (retiring, handles):
        assert retiring.to_stop(routed=False, now=1.0) == handles


def test_listeners_close_when_their_worker_is_gone():
    with _retiring({}) as (retiring, handles):
        socks = retiring.sockets()
        done = retiring.collect(alive=lambda pid: pid == handles[1].pid)
        assert [r.handle for r in done] == [handles[0]] and socks[0].fileno() == -1
        assert retiring.holds(handles[1]) and not retiring.holds(handles[0])
        retiring.close_all()
        assert socks[1].fileno() == -1
