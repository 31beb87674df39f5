"""The master's limits on running workers, end to end against a real
`zion serve`: a loop blocked too long (--timeout-worker-stuck) and memory past
the limit (--limit-worker-memory)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime

import httpx

from tests.admin.support import metrics, status, total
from tests.conftest import get, wait_for
from tests.support.serve import serve
from zion.supervisor.limits import HARD_FACTOR, MIB, RssReader


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


async def test_a_blocked_worker_logs_its_stack_once_and_is_replaced_after_the_timeout(
        start_zion):
    srv = serve(start_zion, "supervise_app:app", "--timeout-worker-stuck", "3",
                "--admin", "127.0.0.1:0", workers=2)
    before = set(srv.worker_pids())
    blocker = asyncio.create_task(get(srv.port, "/block?s=600"))
    # The stack names the app's function that made the blocking call. (On a
    # loaded host the other worker may be reported too, for a late beat while
    # it ran its own code: the report about the app's block is the one here.)
    blocked = await asyncio.to_thread(wait_for, lambda: next(
        (e for e in srv.events("worker_blocked")
         if e["where"].startswith("sleep_in_async_def ")), None), 10, "the app's block reported")
    assert any("in sleep_in_async_def: time.sleep(seconds)" in f for f in blocked["stack"])
    assert any(" in app:" in f for f in blocked["stack"])
    # A light client on new connections loses nothing meanwhile.
    statuses = []
    deadline = time.monotonic() + 20
    while not srv.events("worker_stuck"):
        assert time.monotonic() < deadline, "the blocked worker was never replaced"
        statuses.append((await get(srv.port, "/")).status)
    stuck = srv.events("worker_stuck")[0]
    assert stuck["blocked_s"] >= 3 and _ts(stuck) - _ts(blocked) >= 2.5
    assert stuck["child"] == blocked["pid"]
    after = await asyncio.to_thread(
        wait_for, lambda: len(p := set(srv.worker_pids())) == 2 and blocked["pid"] not in p
        and p, 10, "a replacement worker")
    assert len(after & before) == 1
    for _ in range(20):
        statuses.append((await get(srv.port, "/")).status)
    assert len(statuses) > 20 and set(statuses) == {200}
    # Once, not once per look.
    assert [e["pid"] for e in srv.events("worker_blocked")].count(blocked["pid"]) == 1
    assert [w["stuck_kills"] for w in status(srv)["workers"]] in ([1, 0], [0, 1])
    assert total(metrics(srv), "zion_stuck_kills_total") == 1
    await asyncio.gather(blocker, return_exceptions=True)


async def test_a_busy_worker_is_not_stuck(start_zion):
    # Many requests in flight, each awaiting: the loop turns, nothing is killed.
    srv = serve(start_zion, "supervise_app:app", "--timeout-worker-stuck", "0.5", workers=1)
    results = await asyncio.gather(*(get(srv.port, "/slow?s=1.5") for _ in range(20)))
    assert {r.status for r in results} == {200}
    assert not srv.events("worker_stuck") and not srv.events("worker_blocked")


async def test_a_leaking_worker_is_replaced_without_a_failed_request(start_zion):
    limit = 160
    srv = serve(start_zion, "supervise_app:app", "--limit-worker-memory", str(limit),
                "--admin", "127.0.0.1:0", workers=2)
    peak = [0]
    done = threading.Event()
    reader = RssReader()

    def sample() -> None:
        while not done.is_set():
            for pid in srv.worker_pids():
                peak[0] = max(peak[0], reader.rss(pid) or 0)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(verify=False, timeout=20) as client:
            async def user() -> None:
                for _ in range(80):
                    resp = await client.get(f"https://127.0.0.1:{srv.port}/leak?mib=2")
                    statuses.append(resp.status_code)

            await asyncio.gather(*(user() for _ in range(4)))
    finally:
        done.set()
        sampler.join()
        reader.keep_only(())
    assert len(statuses) == 320 and set(statuses) == {200}
    assert srv.events("worker_memory_limit") and srv.events("worker_replaced")
    assert not srv.events("worker_memory_killed") and not srv.events("worker_died")
    assert sum(w["memory_replacements"] for w in status(srv)["workers"]) == len(
        srv.events("worker_memory_limit"))
    # 320 x 2 MiB went through two workers of 160 MiB: each was replaced at
    # least once, and none grew near the hard ceiling (HARD_FACTOR, a kill)
    # while its replacement started. What it overshoots by is what the four
    # clients leak between two looks of the master, 20 ms apart
    # (master._MEMORY_CHECK) but later on a loaded host, and until the worker
    # runs its SIGUSR2 handler, plus a request per connection it still holds:
    # it takes no new connection. The clients leak as fast as the host
    # answers, so the margin is counted in requests: beside two busy loops on
    # two cores the master looked up to 34 ms late and the handler ran up to
    # 30 ms after the signal, ~19 requests past the limit at worst (30 runs;
    # at 4 MiB a request, peaks 181-237 MiB against the 240 MiB ceiling, one
    # CI run past it). At 2 MiB the ceiling is 40 requests away: peaks
    # 169-197 MiB (14 runs). (Looking at a worker every 250 ms until it was
    # seen growing, the CI run had one go from idle to past the ceiling
    # between two looks, killed mid-request.)
    assert peak[0] < limit * MIB * HARD_FACTOR, f"peak RSS {peak[0] / MIB:.0f} MiB"


async def test_a_worker_past_its_memory_limit_takes_no_new_connection(start_zion, tmp_path):
    # Its replacement is slow to boot (held in lifespan startup): a new
    # connection waits in the listener's queue for it, and the old worker,
    # still growing, never takes it.
    srv = serve(start_zion, "supervise_app:app", "--limit-worker-memory", "200", workers=1,
                env={"ZION_TEST_SLOW_BOOT": str(tmp_path)})
    old = srv.worker_pids()[0]
    # One request takes it past the limit, not past the ceiling (1.5 times):
    # a loop of small leaks could open a new connection after the drain began
    # and wait, with the test, for the release below.
    assert (await get(srv.port, "/leak?mib=200")).status == 200
    await asyncio.to_thread(srv.wait_event, "worker_draining_for_replacement", 20)
    async with httpx.AsyncClient(verify=False, timeout=30) as client:
        answer = asyncio.create_task(client.get(f"https://127.0.0.1:{srv.port}/"))
        await asyncio.to_thread(wait_for, lambda: len(srv.worker_pids()) == 2, 30,
                                "the replacement started")
        (tmp_path / "release").touch()
        resp = await answer
    assert resp.status_code == 200 and int(resp.headers["x-pid"]) != old
    assert not srv.events("worker_memory_killed")


async def test_a_worker_draining_for_its_replacement_is_killed_past_the_ceiling(
        start_zion, tmp_path):
    # Once its replacement was ready, the old worker drained unwatched: a
    # request it held went on leaking, 100 MiB past the ceiling (1.5 x 100
    # MiB), and was answered.
    release = tmp_path / "release"
    srv = serve(start_zion, "supervise_app:app", "--limit-worker-memory", "100", workers=1,
                env={"ZION_TEST_RELEASE": str(release)})
    old = srv.worker_pids()[0]
    held = asyncio.create_task(get(srv.port, "/leak?mib=80&then=100"))
    replaced = await asyncio.to_thread(srv.wait_event, "worker_replaced", 20)
    assert replaced["child"] == old
    release.touch()
    killed = await asyncio.to_thread(srv.wait_event, "worker_memory_killed", 10)
    assert killed["child"] == old and killed["rss_mib"] > 100 * HARD_FACTOR
    # The one request the ceiling is there to fail; the replacement answers.
    assert isinstance((await asyncio.gather(held, return_exceptions=True))[0], Exception)
    resp = await get(srv.port, "/")
    assert resp.status == 200 and int(resp.headers["x-pid"]) != old
    assert len(srv.events("worker_memory_killed")) == 1


# -- the decisions, without processes ------------------------------------------

def test_memory_verdicts_from_this_process_rss():
    import os

    from zion.supervisor.limits import Memory, memory_verdict

    reader = RssReader()
    rss = reader.rss(os.getpid())
    assert rss is not None and rss > MIB
    mib = rss // MIB
    verdicts = [memory_verdict(rss, limit) for limit in (mib * 4, mib - 1, max(1, int(mib / 1.6)))]
    assert verdicts == [Memory.OK, Memory.OVER, Memory.CEILING]
    assert reader.rss(2**22 + 12345) is None  # no such process (pid_max is at most 2^22)


def test_the_rss_reader_follows_growth_and_does_not_outlive_its_process():
    import subprocess
    import sys

    reader = RssReader()
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); "
                              "print(1, flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        before = reader.rss(child.pid)  # its descriptor opens now, before the growth
        assert child.stdout is not None and child.stdout.readline() == b"1\n"
        after = reader.rss(child.pid)
        assert before is not None and after is not None and after - before > 60 * MIB
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    assert reader.rss(child.pid) is None and child.pid not in reader.fds


def test_only_a_ready_slot_whose_heartbeat_is_older_than_the_timeout_is_stuck():
    from zion.demux.board import SlotState, StatusBoard
    from zion.supervisor.limits import stuck_slots

    board = StatusBoard.anonymous(3)
    now = time.monotonic_ns()
    for index, (state, age_s) in enumerate(((SlotState.READY, 5.0), (SlotState.READY, 0.01),
                                            (SlotState.DRAINING, 5.0))):
        board.set_state(index, state, pid=100 + index)
        board.slots[index].heartbeat_ns = now - int(age_s * 1e9)
    [(index, blocked)] = stuck_slots(board, range(3), now, timeout_s=3.0)
    assert index == 0 and 4.9 < blocked < 5.1
