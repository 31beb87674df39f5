"""The accept-queue sampler: the kernel's real queue, into the board."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import get, wait_for
from tests.support.bpf import cannot_load_bpf
from zion.demux.board import StatusBoard
from zion.demux.sampler import QueueSampler, sample


def test_sample_reads_each_listeners_real_queue():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    board = StatusBoard.anonymous(1)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
    wait_for(lambda: (sample([listener], board), board.slots[0].backlog == 5)[1], 5,
             "five queued connections")
    for _ in range(2):
        listener.accept()[0].close()
    sample([listener], board)
    assert board.slots[0].backlog == 3
    sampler = QueueSampler(interval=10.0)
    board.slots[0].backlog = 99
    sampler.maybe_sample(100.0, [listener], board)
    assert board.slots[0].backlog == 3
    board.slots[0].backlog = 99
    sampler.maybe_sample(105.0, [listener], board)  # not due yet
    assert board.slots[0].backlog == 99
    for c in clients:
        c.close()
    listener.close()


@pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
async def test_the_master_samples_so_dispatch_guesses_never_stick(start_zion):
    # The program adds one to a worker's backlog per connection it sends there;
    # only the master's sample puts the real (now empty) queue back.
    srv = start_zion(workers=2)
    for _ in range(20):
        assert (await get(srv.port, "/")).status == 200

    async def backlogs() -> list[int]:
        status = (await get(srv.port, "/_zion/status")).json()
        return [w["backlog"] for w in status["demux"]["workers"]]

    # The status request is itself dispatched (+1) moments before it is read,
    # so poll until one read falls after a sample.
    seen = [await backlogs() for _ in range(1)]
    while seen[-1] != [0, 0] and len(seen) < 200:
        seen.append(await backlogs())
    assert seen[-1] == [0, 0], seen[-5:]
