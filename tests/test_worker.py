"""A worker's life: it dies with its master."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import get, wait_for
from tests.support.bpf import zion_prog_ids
from zion.worker import _Heartbeat


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, and reaped
        return False


def test_workers_die_with_a_sigkilled_master_and_nothing_stays_attached(start_zion):
    srv = start_zion(workers=2, env={"ZION_SUPERVISOR_DRAIN_TIMEOUT": "1"})
    attached = srv.events("demux_attached")
    workers = srv.worker_pids()
    assert len(workers) == 2
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)

    def gone() -> bool:
        return not any(_running(pid) for pid in workers)

    wait_for(gone, 15, "workers to exit after their master died")
    if attached:  # the last descriptor closed with them: the program is gone too
        wait_for(lambda: attached[0]["prog_id"] not in zion_prog_ids(), 10, "program unloaded")


async def test_a_worker_retires_after_limit_max_requests_and_is_replaced(start_zion):
    srv = start_zion("raw_app:app", "--limit-max-requests", "5", workers=1)
    pids: list[str] = []
    # It retires at its next tick (0.5 s) after the fifth answer: keep asking
    # until a second worker answers, every request answered meanwhile.
    for _ in range(2000):
        resp = await get(srv.port, "/")
        assert resp.status == 200
        pids.append(resp.headers["x-pid"])
        if len(set(pids)) >= 2:
            break
    assert len(set(pids)) >= 2, "the worker never retired"
    recycled = srv.wait_event("worker_recycled")
    assert recycled["index"] == 0 and not srv.events("worker_died")


async def test_startup_objects_are_frozen_out_of_the_collectors_reach(start_zion):
    # What import and startup made lives as long as the worker: a full
    # collection that walked it again on every cycle would be pure overhead.
    srv = start_zion("gc_app:app", workers=1)
    resp = await get(srv.port, "/")
    facts = dict(part.split("=") for part in resp.body.decode().split())
    assert int(facts["frozen"]) > 10_000  # zion, uvloop, the app: tens of thousands
    assert int(facts["frozen"]) > 5 * int(facts["tracked"])


class _Loop:
    """call_later recorded, nothing run."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.cancelled = 0

    def call_later(self, delay: float, callback) -> _Loop:
        self.delays.append(delay)
        return self

    def cancel(self) -> None:
        self.cancelled += 1


def test_the_heartbeat_beats_every_interval_with_work_and_four_without():
    # Idle keep-alive connections are no work: only requests in flight and
    # handshakes keep the fast pace (each beat of an idle worker is a wake-up).
    slot = SimpleNamespace(heartbeat_ns=0, conns=5, inflight=0, handshakes=0)
    state = SimpleNamespace(slot=slot, became_busy=None, heartbeat_slow=False)
    loop = _Loop()
    beat = _Heartbeat(loop, state, 0.005)  # type: ignore[arg-type]
    assert slot.heartbeat_ns > 0 and loop.delays == [0.02]
    assert state.heartbeat_slow and state.became_busy == beat.wake
    slot.handshakes = 1
    stamp = slot.heartbeat_ns
    state.became_busy()  # a connection was taken: beat now, at the busy pace
    assert loop.cancelled == 1 and slot.heartbeat_ns >= stamp and loop.delays[-1] == 0.005
    assert not state.heartbeat_slow  # so requests need not call it
    slot.handshakes, slot.inflight = 0, 1
    beat._beat()
    assert loop.delays[-1] == 0.005 and not state.heartbeat_slow
    slot.inflight = 0
    beat._beat()
    assert loop.delays[-1] == 0.02 and state.heartbeat_slow
    beat.stop()
    beat.wake()  # a draining worker's heartbeat stays stopped
    assert len(loop.delays) == 4 and not state.heartbeat_slow
