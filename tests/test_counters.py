"""Per-worker counters in shared memory."""

from __future__ import annotations

import os
import timeit

from zion.counters import CounterBoard, WorkerCounters
from zion.http.state import count_response


def test_a_forked_worker_counts_into_the_masters_view() -> None:
    board = CounterBoard()
    pid = os.fork()
    if pid == 0:
        mine = board.for_worker(3, generation=7)
        for status in (200, 204, 404, 503):
            count_response(mine, status)
        mine.tls_handshakes += 2
        os._exit(0)
    os.waitpid(pid, 0)
    totals = board.totals(3)
    assert totals["requests"] == 4
    assert (totals["responses_4xx"], totals["responses_5xx"]) == (1, 1)
    assert totals["tls_handshakes"] == 2
    assert board.totals(2)["requests"] == 0


def test_consecutive_generations_write_different_banks_and_add_up() -> None:
    board = CounterBoard()
    old, new = board.for_worker(0, 4), board.for_worker(0, 5)
    assert ctypes_address(old) != ctypes_address(new)
    old.requests += 3
    new.requests += 2
    assert board.totals(0)["requests"] == 5


def ctypes_address(counters: WorkerCounters) -> int:
    import ctypes

    return ctypes.addressof(counters)


def test_counting_a_response_costs_well_under_a_microsecond() -> None:
    # The per-request price of /metrics: a function call and two increments
    # in shared memory; a request costs ~10 us (docs/benchmarks.md figures), so this must
    # stay a small fraction of it. A generous bound: CI machines are noisy.
    mine = CounterBoard().for_worker(0, 0)
    per_call = min(timeit.repeat(lambda: count_response(mine, 404), number=20_000,
                                 repeat=5)) / 20_000
    assert per_call < 1e-6, f"{per_call * 1e9:.0f} ns per response"
