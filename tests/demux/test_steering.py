"""Load-aware steering: a stalled worker gets no new connections under
least-loaded, and does under hash (the kernel-hash weakness the demux fixes).
Deterministic: the stall is a real SIGSTOP, and we wait for the program's view
of it (heartbeat age) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import urllib.request
from collections import Counter

import pytest

from tests.conftest import close, connect, get, read_response, wait_for
from tests.support.bpf import cannot_load_bpf

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))


async def slot_view(port: int) -> list[dict]:
    return (await get(port, "/_zion/status")).json()["demux"]["workers"]


async def view_avoiding_stall(port: int) -> list[dict]:
    """The slot view, retried: a poll that lands on a frozen worker waits."""
    for _ in range(100):
        try:
            return await asyncio.wait_for(slot_view(port), 0.5)
        except (TimeoutError, ConnectionError):
            continue
    raise AssertionError("no worker answered the status poll")


async def wait_stalled(port: int, index: int) -> None:
    # Until the heartbeat is older than the threshold (100 ms), the program
    # still counts the frozen worker healthy, so a poll may land on it and
    # wait: poll with a short timeout and try again.
    for _ in range(100):
        try:
            view = await asyncio.wait_for(slot_view(port), 0.5)
        except (TimeoutError, ConnectionError):
            continue
        if view[index]["state"] == "stalled":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"worker {index} never looked stalled")


async def test_least_loaded_steers_around_a_stopped_worker(start_zion):
    srv = start_zion("starlette_app:app", workers=4)
    slots = await slot_view(srv.port)
    victim = slots[1]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        await wait_stalled(srv.port, 1)
        before = (await slot_view(srv.port))[1]["dispatches"]
        results = await asyncio.gather(*(asyncio.wait_for(get(srv.port, "/"), 5)
                                         for _ in range(100)))
        assert all(r.status == 200 for r in results), "every new connection is answered"
        assert str(victim) not in {r.headers["x-pid"] for r in results}
        assert (await view_avoiding_stall(srv.port))[1]["dispatches"] == before
    finally:
        os.kill(victim, signal.SIGCONT)
    # Once it beats again it gets connections again.
    for _ in range(100):
        if (await slot_view(srv.port))[1]["state"] == "ready":
            break
        await asyncio.sleep(0.02)
    pids = {(await get(srv.port, "/")).headers["x-pid"] for _ in range(60)}
    assert str(victim) in pids


@pytest.mark.parametrize("migrate,requeue", [(True, True), (False, True), (True, False)],
                         ids=["moved", "no-migrate", "requeue-off"])
async def test_hash_mode_keeps_sending_to_a_stopped_worker(start_zion, migrate, requeue):
    # The hash ignores heartbeats, so a frozen worker keeps getting its share.
    # With SELECT_OR_MIGRATE the master moves what queues on it to the others
    # (nothing waits); without, or with [demux] requeue off, those wait for it.
    srv = start_zion("starlette_app:app", "--demux", "hash", "--admin", "127.0.0.1:0",
                     workers=4, env={"ZION_DEMUX_MIGRATE": str(migrate).lower(),
                                     "ZION_DEMUX_REQUEUE": str(requeue).lower()})
    slots = await slot_view(srv.port)
    victim = slots[2]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        before = (await view_avoiding_stall(srv.port))[2]["dispatches"]
        tasks = [asyncio.create_task(asyncio.wait_for(get(srv.port, "/"), 2))
                 for _ in range(40)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        stuck = [d for d in done if isinstance(d, (TimeoutError, asyncio.TimeoutError))]
        after = (await view_avoiding_stall(srv.port))[2]["dispatches"]
        assert after > before, "the kernel-style hash still picks the stopped worker"
        requeued = (await asyncio.to_thread(_admin_workers, srv))[2]["requeued"]
        if migrate and requeue:
            assert not stuck, "a stopped worker's queue moves to the others"
            assert requeued >= after - before
        else:
            assert stuck, "connections sent to a stopped worker wait"
            assert requeued == 0
    finally:
        os.kill(victim, signal.SIGCONT)


async def test_killed_worker_slot_is_steered_around_and_queue_served(start_zion):
    # A 3 s backoff: the 40 requests below fit in it on a machine loaded many
    # times over (at 1 s the replacement was sometimes ready before the view).
    srv = start_zion("starlette_app:app", workers=2,
                     env={"ZION_SUPERVISOR_RESPAWN_BACKOFF": "3.0"})
    slots = await slot_view(srv.port)
    victim = slots[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(srv.wait_event, "worker_died")
    # While slot 0 is empty (the backoff), every new connection is answered.
    results = await asyncio.gather(*(asyncio.wait_for(get(srv.port, "/"), 5)
                                     for _ in range(40)))
    assert all(r.status == 200 for r in results)
    assert str(victim) not in {r.headers["x-pid"] for r in results}
    view = await slot_view(srv.port)
    assert view[0]["state"] in ("empty", "starting")
    await asyncio.to_thread(wait_for, lambda: len(srv.worker_pids()) == 2, 10, "replacement")


async def test_connections_queued_on_a_dead_worker_are_served_by_its_replacement(start_zion):
    # hash mode keeps sending to a frozen worker, so connections queue on its
    # socket. Without SELECT_OR_MIGRATE (older kernels, or turned off) the
    # master keeps that socket for the replacement.
    srv = start_zion("starlette_app:app", "--demux", "hash", workers=2,
                     env={"ZION_DEMUX_MIGRATE": "false"})
    victim_slot = 1
    victim = (await slot_view(srv.port))[victim_slot]["pid"]
    os.kill(victim, signal.SIGSTOP)
    before = (await view_avoiding_stall(srv.port))[victim_slot]["dispatches"]
    tasks = [asyncio.create_task(asyncio.wait_for(get(srv.port, "/"), 20)) for _ in range(30)]
    # Wait until some of them are queued behind the frozen worker...
    for _ in range(200):
        if (await view_avoiding_stall(srv.port))[victim_slot]["dispatches"] > before + 2:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("nothing was sent to the frozen worker")
    # ...then it dies. The master holds the socket, so the queue survives it.
    os.kill(victim, signal.SIGKILL)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    pids = {r.headers["x-pid"] for r in results}
    assert str(victim) not in pids
    replacement = (await slot_view(srv.port))[victim_slot]["pid"]
    assert replacement != victim and str(replacement) in pids, "the replacement served the queue"


async def _blocked_workers(port: int, count: int) -> set[int]:
    """Poll until `count` workers each have a request in flight and have not
    beaten for two heartbeat intervals (20 ms each), the program's sign that
    their loop is blocked; their pids."""
    for _ in range(500):
        view = await view_avoiding_stall(port)
        blocked = {w["pid"] for w in view if w["inflight"] >= 1
                   and w["heartbeat_age_ms"] is not None and w["heartbeat_age_ms"] > 40}
        if len(blocked) >= count:
            return blocked
        await asyncio.sleep(0.02)
    raise AssertionError(f"never saw {count} blocked workers")


async def test_two_held_workers_get_no_new_connection_while_two_are_free(start_zion, tmp_path):
    # Two of four workers are blocked inside a synchronous handler. The stall
    # threshold is far beyond the test, so nothing takes them out of the
    # choice: what keeps connections off them is that the program weighs
    # every worker (two hashed choices draw both held ones one time in six)
    # and that a worker whose loop has not beaten for two intervals loses to
    # any other, however loaded the free ones are.
    flag = tmp_path / "hold"
    flag.touch()
    srv = start_zion("steer_app:app", workers=4,
                     env={"STEER_HOLD": str(flag), "ZION_DEMUX_STALL_THRESHOLD_MS": "600000"})
    held = [asyncio.create_task(get(srv.port, "/hold")) for _ in range(2)]
    try:
        busy = await _blocked_workers(srv.port, 2)
        # Eight at a time: the free workers carry more connections than the
        # held ones, so only the "not turning" signal keeps the held ones out.
        pids: list[str] = []
        for _ in range(6):
            batch = await asyncio.gather(*(asyncio.wait_for(get(srv.port, "/"), 10)
                                           for _ in range(8)))
            pids += [r.headers["x-pid"] for r in batch]
        assert len(pids) == 48
        assert not {str(p) for p in busy} & set(pids), "a held worker got a connection"
        assert len(set(pids)) == 2
    finally:
        flag.unlink()
    served_held = {r.headers["x-pid"] for r in await asyncio.gather(*held)}
    assert served_held == {str(p) for p in busy}


async def test_a_burst_of_keepalive_connections_splits_evenly(start_zion):
    # 64 keep-alive connections opened at once across 4 workers: the program
    # counts each connection it sends a worker before that worker has even
    # accepted it, so the split is as even as the count allows (max/min <= 1.2).
    # Counting is what is tested, not ages: on a loaded machine a worker busy
    # with handshakes may not beat for two 5 ms intervals and rightly go last
    # (its loop looks blocked), so the beat is slowed out of the picture.
    srv = start_zion("steer_app:app", workers=4,
                     env={"ZION_DEMUX_HEARTBEAT_INTERVAL_MS": "1000",
                          "ZION_DEMUX_STALL_THRESHOLD_MS": "600000"})
    conns = await asyncio.gather(*(connect(srv.port) for _ in range(64)))
    try:
        pids = []
        for reader, writer in conns:
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            pids.append((await asyncio.wait_for(read_response(reader), 10)).headers["x-pid"])
        split = sorted(Counter(pids).values())
        assert len(split) == 4 and split[-1] / split[0] <= 1.2, split
    finally:
        await asyncio.gather(*(close(writer) for _, writer in conns))


async def test_a_tls_handshake_in_progress_counts_as_load(start_zion):
    # Raw TCP connections that never send a ClientHello: accepted, handshake
    # pending. They count as connections from the accept on (a worker busy
    # with handshakes is busy), and stop counting when the handshake fails.
    srv = start_zion("steer_app:app", workers=2)
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(6)]
    try:
        async def counted() -> int:
            # The status request itself is one open connection.
            return sum(w["connections"] for w in await view_avoiding_stall(srv.port)) - 1

        for _ in range(250):
            if await counted() == 6:
                break
            await asyncio.sleep(0.02)
        assert await counted() == 6
    finally:
        for sock in socks:
            sock.sendall(b"not a TLS record\r\n\r\n")  # the handshake fails now
            sock.close()
    for _ in range(250):
        if await counted() == 0:
            break
        await asyncio.sleep(0.02)
    assert await counted() == 0, "a failed handshake must stop counting"


def _admin_status(srv) -> dict:
    """The host as the master's admin listener reads it: answered even while
    every worker is blocked."""
    port = int(srv.wait_event("admin_listening")["port"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
        return json.load(resp)  # type: ignore[no-any-return]


def _admin_workers(srv) -> list[dict]:
    return _admin_status(srv)["workers"]  # type: ignore[no-any-return]


def test_with_every_worker_blocked_new_connections_wait_for_the_one_blocked_longest(
        start_zion, tmp_path):
    # Both workers are inside a long synchronous call, A for longer than B.
    # A call that started earlier ends earlier, so the next connections queue
    # behind A (as a shared queue would hand them to whoever is free first),
    # not half behind B as their equal load alone would split them, until A's
    # queue outweighs its head start (4 ms per waiting connection).
    flag = tmp_path / "hold"
    for name in ("a", "b"):
        (tmp_path / f"hold{name}").touch()
    srv = start_zion("steer_app:app", "--admin", "127.0.0.1:0", workers=2,
                     env={"STEER_HOLD": str(flag), "ZION_DEMUX_STALL_THRESHOLD_MS": "600000"})
    holds = []

    async def held_since_beat(count: int, oldest_ms: float) -> list[dict]:
        """The workers blocked (in flight, no beat for two 20 ms intervals),
        oldest first, once `count` are and the oldest has not beaten for
        `oldest_ms`."""
        for _ in range(500):
            ws = await asyncio.to_thread(_admin_workers, srv)
            busy = sorted((w for w in ws if w["inflight"] >= 1 and w["heartbeat_age_ms"] > 40),
                          key=lambda w: -w["heartbeat_age_ms"])
            if len(busy) >= count and busy[0]["heartbeat_age_ms"] > oldest_ms:
                return busy
            await asyncio.sleep(0.02)
        raise AssertionError(f"never saw {count} blocked workers")

    async def body() -> None:
        holds.append(asyncio.create_task(get(srv.port, "/hold?a")))
        # A head start of 150 ms: worth more than the 8 connections (32 ms).
        first = (await held_since_beat(1, 150))[0]
        holds.append(asyncio.create_task(get(srv.port, "/hold?b")))
        busy = await held_since_beat(2, 0)
        assert busy[0]["pid"] == first["pid"]
        before = {w["pid"]: w["dispatches"] for w in busy}
        clients = [asyncio.create_task(get(srv.port, "/")) for _ in range(8)]
        for _ in range(500):
            now = {w["pid"]: w["dispatches"] for w in await asyncio.to_thread(_admin_workers, srv)}
            if sum(now.values()) - sum(before.values()) >= 8:
                break
            await asyncio.sleep(0.02)
        got = {pid: now[pid] - before[pid] for pid in now}
        assert got == {first["pid"]: 8, busy[1]["pid"]: 0}, got
        # A comes free first and serves them. (Were B free first, the master
        # would move A's queue to B, as a shared queue would hand it over.)
        (tmp_path / "holda").unlink()
        results = await asyncio.gather(*clients)
        assert {r.headers["x-pid"] for r in results} == {str(first["pid"])}
        (tmp_path / "holdb").unlink()
        await asyncio.gather(*holds)

    asyncio.run(body())


def test_a_blocked_workers_queue_moves_to_the_first_worker_free(start_zion):
    # Both workers stopped: a new connection waits in the accept queue of the
    # one the program picked, as it would in a shared queue. Then the other
    # comes back. A shared queue would hand it the connection; zion's master
    # moves the stopped worker's queue to it in the kernel (shutdown and
    # listen on its listener), and the connection is served while the
    # worker it was sent to is still stopped.
    srv = start_zion("steer_app:app", "--admin", "127.0.0.1:0", workers=2,
                     env={"ZION_DEMUX_STALL_THRESHOLD_MS": "600000"})
    pids = [w["pid"] for w in _admin_workers(srv)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        before = [w["dispatches"] for w in _admin_workers(srv)]
        client = socket.create_connection(("127.0.0.1", srv.port))
        wait_for(lambda: sum(w["dispatches"] for w in _admin_workers(srv)) > sum(before), 10,
                 "the connection to be dispatched")
        ws = _admin_workers(srv)
        [chosen] = [i for i, w in enumerate(ws) if w["dispatches"] > before[i]]
        wait_for(lambda: _admin_workers(srv)[chosen]["accept_queue"] == 1, 10,
                 "the connection to wait in the stopped worker's accept queue")
        other = 1 - chosen
        os.kill(pids[other], signal.SIGCONT)
        # The same connection, now answered by the worker that came back.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        client.settimeout(10)
        with ctx.wrap_socket(client, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert f"x-pid: {pids[other]}".encode() in answer.lower()
        ws = _admin_workers(srv)
        assert ws[chosen]["requeued"] == 1 and ws[other]["requeued"] == 0
        assert ws[chosen]["accept_queue"] == 0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # The listener that was shut and listened again is the stopped worker's
    # still: once back, it is sent connections and serves them.
    wait_for(lambda: all(w["state"] == "ready" for w in _admin_workers(srv)), 10, "both ready")
    fallbacks = _admin_status(srv)["demux"]["fallbacks"]

    async def spread() -> set[str]:
        got: set[str] = set()
        for _ in range(100):
            got |= {r.headers["x-pid"] for r in await asyncio.gather(
                *(get(srv.port, "/") for _ in range(4)))}
            if len(got) == 2:
                break
        return got

    assert asyncio.run(spread()) == {str(p) for p in pids}
    # ...by the program's choice: the listener is back in the sockarray too.
    assert _admin_status(srv)["demux"]["fallbacks"] == fallbacks


def test_with_every_worker_stalled_the_program_still_chooses(start_zion):
    # Both workers frozen past the stall threshold: rather than leave the
    # connection to the kernel's hash, the program picks the one frozen
    # longest (the same reasoning as for blocked ones), and nothing falls back.
    srv = start_zion("steer_app:app", "--admin", "127.0.0.1:0", workers=2)
    ws = _admin_workers(srv)
    first, second = ws[0]["pid"], ws[1]["pid"]
    os.kill(first, signal.SIGSTOP)
    try:
        wait_for(lambda: _admin_workers(srv)[0]["heartbeat_age_ms"] > 150, 10, "a head start")
        os.kill(second, signal.SIGSTOP)
        wait_for(lambda: all(w["state"] == "stalled" for w in _admin_workers(srv)), 10,
                 "both stalled")
        port = int(srv.wait_event("admin_listening")["port"])

        def status() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                return json.load(r)  # type: ignore[no-any-return]

        before = status()
        clients = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
        after = status()
        for c in clients:
            c.close()
    finally:
        os.kill(first, signal.SIGCONT)
        os.kill(second, signal.SIGCONT)
    assert after["demux"]["fallbacks"] == before["demux"]["fallbacks"]
    got = [a["dispatches"] - b["dispatches"] for a, b in zip(after["workers"],
                                                              before["workers"], strict=True)]
    assert got == [4, 0], got
