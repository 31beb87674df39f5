"""The accept-queue sampler: the kernel's real queue, into the board."""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests.conftest import get, wait_for
from tests.support.bpf import cannot_load_bpf
from zion.demux.board import StatusBoard
from zion.demux.sampler import QueueSampler, sample


def test_sample_reads_each_listeners_real_queue():
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        board = StatusBoard.anonymous(1)
        for _ in range(5):
            stack.enter_context(socket.create_connection(listener.getsockname()))
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
        # Due within `ahead`: the master is awake for the mover's look, and
        # the sample rides on that wake-up instead of taking one of its own.
        sampler.maybe_sample(105.0, [listener], board, ahead=4.0)  # due at 110
        assert board.slots[0].backlog == 99
        sampler.maybe_sample(105.0, [listener], board, ahead=5.0)
        assert board.slots[0].backlog == 3
        assert sampler.next_at == 115.0


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


def test_drift_in_the_not_yet_accepted_count_is_corrected_after_a_window():
    # The program counted 7 dispatches, the worker accepted 3, and nothing is
    # queued: 4 connections died before they were accepted. Once that excess
    # has lasted a whole window it is written off (dropped), and the program's
    # pending count is exact again; a real queue is never written off.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    board = StatusBoard.anonymous(1)
    slot = board.slots[0]
    slot.dispatches, slot.accepted = 7, 3
    client = socket.create_connection(listener.getsockname())  # one really queued
    wait_for(lambda: (sample([listener], board), slot.backlog == 1)[1], 5, "one queued")
    slot.dispatches += 1  # the program counted that one too
    sampler = QueueSampler(interval=0.01, window=1.0)
    sampler.maybe_sample(100.0, [listener], board)  # opens the window
    assert slot.pending == 5
    sampler.maybe_sample(100.5, [listener], board)
    assert slot.pending == 5, "not before the window ends"
    sampler.maybe_sample(101.0, [listener], board)
    assert slot.pending == 1, "the queued connection still counts, the dead ones do not"
    # More accepted than dispatched (the kernel's hash placed some): the
    # count comes back up to the real queue.
    slot.accepted += 3
    sampler.maybe_sample(101.5, [listener], board)
    sampler.maybe_sample(102.0, [listener], board)
    assert slot.pending == 1
    client.close()
    listener.close()


def test_a_slot_whose_count_was_set_anew_is_not_corrected_by_the_old_window():
    # The master moved the slot's queue and wrote its count off
    # (forget_pending): what the window saw before says nothing now, and
    # applying it would invent connections that are not there.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    board = StatusBoard.anonymous(1)
    slot = board.slots[0]
    slot.dispatches, slot.accepted = 3, 5  # two placed by the kernel's hash
    sampler = QueueSampler(interval=0.01, window=1.0)
    sampler.maybe_sample(100.0, [listener], board)
    sampler.maybe_sample(100.5, [listener], board)
    board.forget_pending(0)
    sampler.forget(0)
    sampler.maybe_sample(101.0, [listener], board)
    assert slot.pending == 0 and slot.dropped == (slot.dispatches - slot.accepted) % (1 << 64)
    listener.close()
