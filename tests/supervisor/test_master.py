"""The master: one listener per worker, supervision, drain, reload, privileges."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import APPS, get, inflight, wait_for
from tests.support.bpf import cannot_load_bpf, prog_fds, zion_prog_ids
from tests.support.netns import NetNS, unavailable
from zion import caps


def listening_sockets(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def listener_holders(port: int) -> list[set[int]]:
    """For each listener on `port`, the pids holding a descriptor of it."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [{int(pid) for pid in re.findall(r"pid=(\d+)", line)}
            for line in out.splitlines() if line.strip()]


async def test_one_listener_per_worker_and_children(start_zion):
    srv = start_zion(workers=3)
    assert listening_sockets(srv.port) == 3
    assert len(srv.worker_pids()) == 3
    assert (await get(srv.port, "/")).status == 200
    # The close-list: each worker holds its own listener only. One it inherited
    # and never accepts on would keep connections queued with nobody to take them.
    holders = listener_holders(srv.port)
    assert sorted(len(h) for h in holders) == [2, 2, 2] and all(srv.pid in h for h in holders)
    assert {pid for h in holders for pid in h} == {srv.pid, *srv.worker_pids()}


async def test_ipv6(start_zion):
    srv = start_zion("--host", "::1")
    resp = await get(srv.port, "/_zion/healthz", host="::1")
    assert resp.status == 200


async def test_sigkilled_worker_is_replaced_on_same_socket(start_zion):
    srv = start_zion(workers=2)
    before = srv.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    # Answers continue while the replacement starts...
    for _ in range(20):
        assert (await get(srv.port, "/")).status == 200
    after = wait_for(lambda: (p := srv.worker_pids()) and len(p) == 2 and before[0] not in p
                     and p, 10, "a replacement worker")
    assert before[1] in after
    assert listening_sockets(srv.port) == 2  # still the same group, no new sockets
    died = srv.wait_event("worker_died")
    assert died["status"] == "signal SIGKILL"


async def test_sigterm_lets_inflight_requests_finish(start_zion):
    srv = start_zion("starlette_app:app")
    slow = [asyncio.create_task(get(srv.port, "/slow?s=1.5")) for _ in range(4)]
    await asyncio.to_thread(wait_for, lambda: inflight(srv.port) >= 4, 10, "requests in flight")
    srv.signal(signal.SIGTERM)
    results = await asyncio.gather(*slow)
    assert [r.status for r in results] == [200] * 4
    assert all(r.body == b"slept 1.5" for r in results)
    assert await asyncio.to_thread(srv.proc.wait, 20) == 0


async def test_sigint_exits_zero(start_zion):
    srv = start_zion()
    srv.signal(signal.SIGINT)
    assert await asyncio.to_thread(srv.proc.wait, 20) == 0


async def test_workers_run_without_bpf_capabilities(start_zion):
    srv = start_zion()
    bpf_bits = (1 << caps.CAP_BPF) | (1 << caps.CAP_SYS_ADMIN)
    for pid in srv.worker_pids():
        assert cap_eff(pid) & bpf_bits == 0, f"worker {pid} kept CAP_BPF/CAP_SYS_ADMIN"
    if os.geteuid() == 0:
        assert cap_eff(srv.pid) & (1 << caps.CAP_BPF), "the master keeps CAP_BPF"


async def test_sighup_reload_replaces_workers_without_downtime(start_zion):
    srv = start_zion("starlette_app:app", workers=2)
    old = set(srv.worker_pids())
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load() -> None:
        while not stop.is_set():
            statuses.append((await get(srv.port, "/")).status)

    runners = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.3)
    srv.signal(signal.SIGHUP)
    await asyncio.to_thread(srv.wait_event, "reload_complete", 30)
    await asyncio.to_thread(
        wait_for, lambda: not (set(srv.worker_pids()) & old), 20, "old workers to exit")
    stop.set()
    await asyncio.gather(*runners)
    assert statuses and set(statuses) == {200}
    new = {int(p) for p in srv.events("reload_complete")[-1]["pids"]}
    assert new.isdisjoint(old)
    resp = await get(srv.port, "/")
    assert int(resp.headers["x-pid"]) in new


def test_port_in_use_is_one_clear_error(start_zion):
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        srv = start_zion("--port", str(port), ready=False)
        assert srv.proc.wait(20) == 1
        fatal = srv.events("fatal")
        assert len(fatal) == 1 and "cannot bind" in fatal[0]["error"]
    finally:
        holder.close()


async def _under_load(port: int, stop: asyncio.Event, failures: list, statuses: list) -> None:
    while not stop.is_set():
        try:
            statuses.append((await asyncio.wait_for(get(port, "/"), 10)).status)
        except Exception as exc:  # a reset or refused connection is what we look for
            failures.append(repr(exc))


async def test_reload_changes_worker_count_without_losing_connections(start_zion, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 4\n")
    srv = start_zion("starlette_app:app", "--config", str(cfg), workers=None)
    assert listening_sockets(srv.port) == 4
    stop, failures, statuses = asyncio.Event(), [], []
    runners = [asyncio.create_task(_under_load(srv.port, stop, failures, statuses))
               for _ in range(6)]
    try:
        await asyncio.sleep(0.3)
        cfg.write_text("[server]\nworkers = 2\n")
        srv.signal(signal.SIGHUP)
        done = await asyncio.to_thread(srv.wait_event, "reload_complete", 30)
        assert len(done["pids"]) == 2
        if cannot_load_bpf() is None:
            # Retired listeners close only once their queue is empty.
            await asyncio.to_thread(wait_for, lambda: len(srv.events("listener_retired")) == 2,
                                    20, "two retired listeners")
        await asyncio.to_thread(wait_for, lambda: listening_sockets(srv.port) == 2, 20,
                                "two listeners")
        await asyncio.sleep(0.3)
        cfg.write_text("[server]\nworkers = 3\n")
        srv.signal(signal.SIGHUP)
        await asyncio.to_thread(
            wait_for, lambda: len(srv.events("reload_complete")) == 2, 30, "second reload")
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*runners)
    assert not failures, failures[:5]
    assert statuses and set(statuses) == {200}
    assert listening_sockets(srv.port) == 3
    await asyncio.to_thread(wait_for, lambda: len(srv.worker_pids()) == 3, 20, "3 workers")
    if cannot_load_bpf() is None:
        # An old worker may have accepted, before it stopped, a connection the
        # new program counted for its slot: that slot looks one connection
        # busier until the master's sampler writes the excess off (a window,
        # 1 s), and one after another these requests would all go to an idle
        # worker. Wait for the count to be exact.
        for _ in range(100):
            slots = (await get(srv.port, "/_zion/status")).json()["demux"]["workers"]
            if not any(w["pending"] for w in slots):
                break
            await asyncio.sleep(0.05)
    pids = {(await get(srv.port, "/")).headers["x-pid"] for _ in range(60)}
    assert len(pids) == 3
    if cannot_load_bpf() is None:
        assert prog_fds(srv.pid) == 1, "replaced programs must be released"
        attached = srv.events("demux_attached")
        assert [a["workers"] for a in attached] == [4, 2, 3]
        assert attached[-1]["prog_id"] in zion_prog_ids()


# -- supervision limits, end to end ----------------------------------------------

def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def test_crash_loop_limit_stops_the_master_with_one_line(start_zion):
    # No demux: what is tested here is the master's, and boot is seconds faster.
    srv = start_zion("crash_on_import:app", "--no-bpf-demux", "--log-level", "debug",
                     env={"ZION_SUPERVISOR_CRASH_LOOP_LIMIT": "3",
                          "ZION_SUPERVISOR_RESPAWN_BACKOFF": "0.2"},
                     workers=1, ready=False)
    assert srv.proc.wait(30) == 3
    fatal = srv.events("fatal")
    assert len(fatal) == 1 and "died 3 times in a row" in fatal[0]["error"]
    assert "exit 7" in fatal[0]["error"]
    died = srv.events("worker_died")  # two respawns, then the give-up
    assert [d["respawn_in_s"] for d in died] == [0.2, 0.4]  # the backoff doubles
    # ...and the master really waits that long before each respawn.
    spawned = srv.events("worker_spawned")
    assert len(spawned) == 3
    for death, respawn in zip(died, spawned[1:], strict=True):
        assert _ts(respawn) - _ts(death) >= death["respawn_in_s"] - 0.01


def test_boot_timeout_kills_a_worker_that_never_becomes_ready(start_zion):
    srv = start_zion("hang_on_import:app", "--no-bpf-demux",
                     env={"ZION_SUPERVISOR_BOOT_TIMEOUT": "0.5",
                          "ZION_SUPERVISOR_CRASH_LOOP_LIMIT": "2",
                          "ZION_SUPERVISOR_RESPAWN_BACKOFF": "0.01"},
                     workers=1, ready=False)
    assert srv.proc.wait(30) == 3
    assert len(srv.events("worker_boot_timeout")) == 2
    assert "signal SIGKILL" in srv.events("fatal")[0]["error"]


RELOAD_THAT_CANNOT_START = """
import os
import time

try:
    os.close(os.open("MARKER", os.O_CREAT | os.O_EXCL))
except FileExistsError:
    time.sleep(3600)
os._exit(7)
"""


async def test_a_reload_whose_workers_cannot_start_keeps_the_old_ones(start_zion, tmp_path):
    app = tmp_path / "swap_app.py"
    app.write_text((APPS / "raw_app.py").read_text())
    srv = start_zion("swap_app:app", "--app-dir", str(tmp_path), workers=2)
    old = set(srv.worker_pids())
    # The first new worker to import the new code dies; the other hangs, never ready.
    app.write_text(RELOAD_THAT_CANNOT_START.replace("MARKER", str(tmp_path / "first")))
    srv.signal(signal.SIGHUP)
    failed = await asyncio.to_thread(srv.wait_event, "reload_failed", 30)
    assert "died before ready" in failed["error"] and failed["kept_generation"] == 0
    # The hanging new worker is killed at once (not left to its boot timeout),
    # and nothing of the running generation is touched: one error line.
    await asyncio.to_thread(wait_for, lambda: set(srv.worker_pids()) == old, 10,
                            "only the old workers")
    assert len(srv.events("reload_failed")) == 1 and not srv.events("reload_complete")
    assert not srv.events("worker_died")
    for _ in range(10):
        resp = await get(srv.port, "/")
        assert resp.status == 200 and int(resp.headers["x-pid"]) in old
    assert srv.proc.poll() is None


HALF_STARTED_RELOAD = """
import asyncio
import os
import pathlib
import time

DIR = pathlib.Path("TMP")
try:
    os.close(os.open(DIR / "first", os.O_CREAT | os.O_EXCL))
except FileExistsError:  # every other new worker fails once the first one serves
    while not (DIR / "go").exists():
        time.sleep(0.01)
    os._exit(7)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    with open(DIR / "serving", "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    await asyncio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": b"new"})
"""


async def test_an_aborted_reload_lets_its_ready_workers_finish_their_requests(start_zion,
                                                                              tmp_path):
    app = tmp_path / "swap_app.py"
    app.write_text((APPS / "raw_app.py").read_text())
    srv = start_zion("swap_app:app", "--app-dir", str(tmp_path), "--no-bpf-demux", workers=2)
    old = set(srv.worker_pids())
    app.write_text(HALF_STARTED_RELOAD.replace("TMP", str(tmp_path)))
    srv.signal(signal.SIGHUP)
    serving = tmp_path / "serving"
    # The first new worker shares the listeners with the old ones: send requests
    # until it holds some (each takes a second there).
    requests = []
    deadline = asyncio.get_running_loop().time() + 20
    while not serving.exists():
        assert asyncio.get_running_loop().time() < deadline, "no request reached a new worker"
        requests += [asyncio.create_task(get(srv.port, "/")) for _ in range(4)]
        await asyncio.sleep(0.05)
    (tmp_path / "go").touch()  # now the second new worker dies: the reload aborts
    results = await asyncio.gather(*requests, return_exceptions=True)
    assert [getattr(r, "status", r) for r in results] == [200] * len(results)
    assert b"new" in {r.body for r in results}  # some were in the aborted worker's hands
    failed = await asyncio.to_thread(srv.wait_event, "reload_failed", 10)
    assert "exit 7" in failed["error"]
    await asyncio.to_thread(wait_for, lambda: set(srv.worker_pids()) == old, 10,
                            "only the old workers")
    status = (await get(srv.port, "/_zion/status")).json()
    assert {w["pid"] for w in status["demux"]["workers"]} == old


def _listener_queues(port: int, ns: str | None = None) -> list[int]:
    """Recv-Q of each listener on `port`: its accept queue, from the kernel."""
    where = ["ip", "netns", "exec", ns] if ns else []
    out = subprocess.run([*where, "ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
async def test_connections_queued_on_a_retired_listener_are_served(start_zion, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 4\n")
    # hash mode: the program keeps sending a stopped worker its share, so its queue fills
    # Without SELECT_OR_MIGRATE (older kernels, or turned off) and with
    # net.ipv4.tcp_migrate_req=0, the retired listener is kept until drained.
    srv = start_zion("raw_app:app", "--config", str(cfg), "--demux", "hash", workers=None,
                     env={"ZION_DEMUX_MIGRATE": "false"})
    status = (await get(srv.port, "/_zion/status")).json()
    doomed = next(w["pid"] for w in status["demux"]["workers"] if w["worker"] == 3)
    os.kill(doomed, signal.SIGSTOP)
    try:
        clients = [asyncio.create_task(get(srv.port, "/")) for _ in range(40)]

        def queued_on_the_stopped_one() -> bool:
            pending = sum(not c.done() for c in clients)
            return pending > 0 and sum(_listener_queues(srv.port)) == pending

        await asyncio.to_thread(wait_for, queued_on_the_stopped_one, 15,
                                "connections queued behind the stopped worker")
        cfg.write_text("[server]\nworkers = 2\n")
        srv.signal(signal.SIGHUP)
        await asyncio.to_thread(srv.wait_event, "reload_complete", 20)
        # Its listener still holds connections: it is not retired, its worker not stopped.
        await asyncio.to_thread(wait_for, lambda: len(srv.events("listener_retired")) == 1,
                                10, "the empty retired listener to close")
    finally:
        os.kill(doomed, signal.SIGCONT)
    results = await asyncio.gather(*clients)
    assert [r.status for r in results] == [200] * 40
    await asyncio.to_thread(wait_for, lambda: len(srv.events("listener_retired")) == 2, 20,
                            "the second retired listener to close once drained")


# -- closing listeners hand their queue over in the kernel -------------------------
# Each runs in a network namespace of its own, where net.ipv4.tcp_migrate_req
# (a per-namespace sysctl) is set as the case says.

_MIGRATE_REQ = [pytest.param("0", id="tcp_migrate_req=0"),
                pytest.param("1", id="tcp_migrate_req=1")]


def cannot_make_netns() -> str | None:
    return unavailable()


@contextlib.contextmanager
def netns(tag: int, sysctls: dict[str, str]) -> Iterator[str]:
    """A namespace of this test's own with `sysctls` set; its name."""
    ns = NetNS("steer", os.getpid() + tag).create()
    try:
        for key, value in sysctls.items():
            subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-q", "-w",
                            f"{key}={value}"], check=True, capture_output=True, timeout=10)
        yield ns.name
    finally:
        ns.remove()


def run_inside(name: str, make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on a thread that joined namespace `name`, so the
    client's sockets are the namespace's."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            ns = NetNS("steer", 0)
            ns.name = name
            ns.enter()
            out["value"] = asyncio.run(make())  # type: ignore[arg-type]
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


async def _queue_behind_stopped(port: int, ns: str, count: int) -> list[asyncio.Task]:
    """`count` clients; returns once those not answered all wait in accept
    queues (a stopped worker's), as the kernel reports them."""
    clients = [asyncio.create_task(get(port, "/")) for _ in range(count)]

    def queued() -> bool:
        waiting = sum(not c.done() for c in clients)
        return waiting > 0 and sum(_listener_queues(port, ns)) == waiting

    await asyncio.to_thread(wait_for, queued, 15, "connections queued behind a stopped worker")
    return clients


@pytest.mark.skipif(cannot_make_netns() is not None, reason=str(cannot_make_netns()))
@pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
@pytest.mark.parametrize("migrate_req", _MIGRATE_REQ)
def test_a_dead_workers_queue_moves_to_a_live_worker(start_zion, migrate_req):
    # hash mode keeps sending a stopped worker its share, so its queue fills
    # (the master would move a blocked worker's queue at once: not here, this
    # is about the death); then it dies. Its replacement is a minute away
    # (respawn backoff), so only the migration can answer those in time.
    with netns(1, {"net.ipv4.tcp_migrate_req": migrate_req}) as ns:
        srv = start_zion("steer_app:app", "--demux", "hash", workers=2,
                         wrapper=["ip", "netns", "exec", ns],
                         env={"ZION_SUPERVISOR_RESPAWN_BACKOFF": "60",
                              "ZION_SUPERVISOR_RESPAWN_BACKOFF_MAX": "60",
                              "ZION_DEMUX_REQUEUE": "false"})

        async def body() -> tuple[int, set[str]]:
            view = (await get(srv.port, "/_zion/status")).json()["demux"]["workers"]
            victim, survivor = view[1]["pid"], view[0]["pid"]
            os.kill(victim, signal.SIGSTOP)
            clients = await _queue_behind_stopped(srv.port, ns, 30)
            os.kill(victim, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*clients), 20)
            assert [r.status for r in results] == [200] * 30
            return survivor, {r.headers["x-pid"] for r in results}

        survivor, pids = run_inside(ns, body)
        assert pids == {str(survivor)}
        replaced = srv.wait_event("listener_replaced")
        assert replaced["index"] == 1 and replaced["migrated"] > 0


@pytest.mark.skipif(cannot_make_netns() is not None, reason=str(cannot_make_netns()))
@pytest.mark.parametrize("demux,migrate_req", [
    pytest.param("bpf", "0", id="select_or_migrate,tcp_migrate_req=0",
                 marks=pytest.mark.skipif(cannot_load_bpf() is not None,
                                          reason=str(cannot_load_bpf()))),
    pytest.param("bpf", "1", id="select_or_migrate,tcp_migrate_req=1",
                 marks=pytest.mark.skipif(cannot_load_bpf() is not None,
                                          reason=str(cannot_load_bpf()))),
    pytest.param("kernel", "1", id="kernel_hash,tcp_migrate_req=1"),
])
def test_a_retired_listeners_queue_moves_while_its_worker_is_stopped(start_zion, tmp_path,
                                                                     demux, migrate_req):
    # A shrink from 4 to 2 while the worker of a listener being retired is
    # stopped: it cannot drain its queue, so only the kernel's migration
    # (through the program, or its hash with tcp_migrate_req=1) answers it.
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 4\n")
    how = ["--demux", "hash"] if demux == "bpf" else ["--no-bpf-demux"]
    with netns(2, {"net.ipv4.tcp_migrate_req": migrate_req}) as ns:
        # Not the master's move of a blocked worker's queue: the shrink's.
        srv = start_zion("steer_app:app", "--config", str(cfg), *how, workers=None,
                         wrapper=["ip", "netns", "exec", ns],
                         env={"ZION_DEMUX_REQUEUE": "false"})

        async def body() -> None:
            pids = [int(p) for p in srv.worker_pids()]
            status = (await get(srv.port, "/_zion/status")).json()["demux"]["workers"]
            doomed = next(w["pid"] for w in status if w["worker"] == 3)
            assert doomed in pids
            os.kill(doomed, signal.SIGSTOP)
            try:
                clients = await _queue_behind_stopped(srv.port, ns, 40)
                cfg.write_text("[server]\nworkers = 2\n")
                srv.signal(signal.SIGHUP)
                await asyncio.to_thread(srv.wait_event, "reload_complete", 20)
                results = await asyncio.wait_for(asyncio.gather(*clients), 20)
                assert [r.status for r in results] == [200] * 40
                assert str(doomed) not in {r.headers["x-pid"] for r in results}
            finally:
                os.kill(doomed, signal.SIGCONT)

        run_inside(ns, body)


def _voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_an_idle_master_sleeps(start_zion):
    # Every wake-up of the master costs CPU on a machine that serves nothing
    # (at the old 100 Hz sampling: ~2 % of a core). It wakes for the queue
    # sampler (10 Hz), heartbeat checks and signals: count its sleeps over 3 s.
    srv = start_zion(workers=2)
    wait_for(lambda: len(srv.worker_pids()) == 2, 10, "workers")
    before = _voluntary_switches(srv.pid)
    started = datetime.now()
    threading.Event().wait(3.0)
    elapsed = (datetime.now() - started).total_seconds()
    wakeups = _voluntary_switches(srv.pid) - before
    assert wakeups < 40 * elapsed, f"{wakeups} wake-ups in {elapsed:.1f} s"


async def test_shutdown_delay_fails_readiness_and_keeps_serving_new_connections(start_zion):
    from tests.admin.support import admin_get

    srv = start_zion("--shutdown-delay", "3", "--admin", "127.0.0.1:0", workers=2)
    assert admin_get(srv, "/ready")[0] == 200
    assert (await get(srv.port, "/_zion/ready")).status == 200
    srv.signal(signal.SIGTERM)
    await asyncio.to_thread(srv.wait_event, "shutdown_delayed", 10)
    await asyncio.to_thread(wait_for, lambda: admin_get(srv, "/ready")[0] == 503, 5,
                            "the admin /ready to fail")
    # Every worker's own readiness fails too (new connections reach both).
    readiness = [(await get(srv.port, "/_zion/ready")).status for _ in range(10)]
    assert readiness == [503] * 10
    # New connections are still accepted and served while readiness says 503.
    for _ in range(10):
        assert (await get(srv.port, "/")).status == 200
    assert not srv.events("shutting_down") and srv.proc.poll() is None
    assert await asyncio.to_thread(srv.proc.wait, 20) == 0
    delayed, drained = srv.events("shutdown_delayed")[0], srv.events("shutting_down")[0]
    assert _ts(drained) - _ts(delayed) >= 2.9


def test_the_listening_line_prints_no_empty_field(start_zion):
    # no app, no --root, no PROXY protocol: those keys are left out, not `app=`
    srv = start_zion("--log-format", "logfmt", ready=False)
    line = wait_for(lambda: next((ln for ln in srv.log_text().splitlines()
                                  if "event=listening" in ln), None), 30, "listening")
    assert not re.search(r"\w=(\s|$)", line), line
    assert " app=" not in line and " root=" not in line and "proxy_protocol" not in line
