"""The admin listener and agent port of a real `zion serve`: every figure
comes from real requests, real worker processes and real signals."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.admin.support import admin_get, agent_line, metrics, status, tls_request, total
from tests.conftest import APPS, wait_for

ADMIN = ("--admin", "127.0.0.1:0", "--agent", "127.0.0.1:0")


def serve(start_zion, workers: int = 2, *extra: str, env: dict[str, str] | None = None):
    return start_zion("admin_app:app", *ADMIN, *extra, workers=workers, env=env)


def serve_hash(start_zion, workers: int = 2):
    """Without the demux (a second of compiling saved): the agent and /ready
    judge workers by their heartbeats whatever routes connections."""
    return serve(start_zion, workers, "--no-bpf-demux")


def background(port: int, path: str) -> tuple[threading.Thread, list[bytes]]:
    out: list[bytes] = []

    def run() -> None:
        out.append(tls_request(port, path)[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_metrics_are_real_counts_of_real_requests(start_zion):
    srv = serve(start_zion)
    for path, times in (("/", 5), ("/status/404", 3), ("/status/500", 2)):
        for _ in range(times):
            tls_request(srv.port, path)
    _, session, _ = tls_request(srv.port)  # a TLS session to resume
    _, _, reused = tls_request(srv.port, session=session)
    assert reused
    slow, answers = background(srv.port, "/slow?3")

    def in_flight():
        m = metrics(srv)
        return m if total(m, "zion_requests_in_flight") == 1 else None

    m = wait_for(in_flight, what="the slow request in flight")
    assert total(m, "zion_requests_total") == 12
    assert total(m, "zion_responses_total", code="4xx") == 3
    assert total(m, "zion_responses_total", code="5xx") == 2
    assert total(m, "zion_connections_accepted_total") == 13
    assert total(m, "zion_tls_handshakes_total") == 13
    assert total(m, "zion_tls_resumptions_total") >= 1
    assert total(m, "zion_open_connections") >= 1
    assert total(m, "zion_worker_state", state="ready") == 2
    for worker in ("0", "1"):
        assert 0 <= total(m, "zion_heartbeat_age_seconds", worker=worker) < 1
        # every worker served some: the counts are per worker, not a copy
        assert total(m, "zion_requests_total", worker=worker) >= 1
    assert total(m, "zion_ready") == 1
    assert 1 <= total(m, "zion_weight_percent") < 100  # one worker has a request in flight
    doc = status(srv)
    state = doc["demux"]["state"]
    assert total(m, "zion_demux_state", state=state) == 1
    assert sum(v for (n, _), v in m.items() if n == "zion_demux_state") == 1
    if state == "attached":
        assert total(m, "zion_dispatches_total") == 13
        assert total(m, "zion_demux_fallbacks_total") == 0
    assert [w["requests"] for w in doc["workers"]] == [
        total(m, "zion_requests_total", worker=str(i)) for i in range(2)]
    slow.join(10)
    assert answers and answers[0].startswith(b"HTTP/1.1 200")
    assert total(metrics(srv), "zion_requests_total") == 13


def test_master_counts_respawns_stalls_and_reloads(start_zion):
    # A 2 s stall threshold: the SIGSTOP below is a stall however long the
    # test waits, while a worker merely not scheduled for 100 ms (the default)
    # on a loaded host is not counted as a second one.
    srv = serve(start_zion, env={"ZION_DEMUX_STALL_THRESHOLD_MS": "2000"})
    doc = status(srv)
    first, second = (w["pid"] for w in doc["workers"])
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: total(metrics(srv), "zion_respawns_total", worker="0") == 1
             and status(srv)["workers"][0]["state"] == "ready", what="a respawn counted")
    os.kill(second, signal.SIGSTOP)
    try:
        m = wait_for(lambda: (m := metrics(srv)) and total(
            m, "zion_worker_state", worker="1", state="stalled") == 1 and m,
            what="worker 1 seen stalled")
        assert total(m, "zion_stalls_total", worker="1") == 1
        assert total(m, "zion_stalls_total", worker="0") == 0
    finally:
        os.kill(second, signal.SIGCONT)
    wait_for(lambda: status(srv)["workers"][1]["state"] == "ready", what="worker 1 back")
    srv.signal(signal.SIGHUP)
    wait_for(lambda: total(metrics(srv), "zion_reloads_total") == 1, what="a reload counted")
    m = metrics(srv)
    assert total(m, "zion_generation") == 1
    assert total(m, "zion_respawns_total") == 1  # the reload replaced, it did not respawn
    assert total(m, "zion_stalls_total") == 1


def test_frozen_worker_queue_fallbacks_ready_and_agent(start_zion):
    srv = serve(start_zion, 1)
    assert admin_get(srv, "/ready") == (200, b"serving\n")
    assert agent_line(srv) == "up ready 100%\n"
    (pid,) = srv.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    queued = []
    try:
        wait_for(lambda: agent_line(srv) == "down #no healthy worker\n",
                 what="the agent to report no healthy worker")
        assert admin_get(srv, "/ready") == (503, b"no healthy worker\n")
        for _ in range(3):
            queued.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        m = wait_for(lambda: (m := metrics(srv)) and total(
            m, "zion_accept_queue_length", worker="0") == 3 and m, what="3 queued")
        if status(srv)["demux"]["state"] == "attached":
            # No healthy worker: the program still picks among the ready ones
            # (stalled ones rank last, they are not skipped), so nothing falls
            # back to the kernel's hash and the dispatches say where they went.
            assert total(m, "zion_demux_fallbacks_total") == 0
            assert total(m, "zion_dispatches_total", worker="0") >= 3
        assert total(m, "zion_ready") == 0 and total(m, "zion_weight_percent") == 0
    finally:
        os.kill(pid, signal.SIGCONT)
        for sock in queued:
            sock.close()
    wait_for(lambda: agent_line(srv) == "up ready 100%\n", what="the agent back up")


def test_agent_weight_follows_stalls_and_load(start_zion):
    srv = serve_hash(start_zion)
    first, second = srv.worker_pids()
    os.kill(first, signal.SIGSTOP)
    try:
        wait_for(lambda: agent_line(srv) == "up ready 50%\n", what="half the weight")
        os.kill(second, signal.SIGSTOP)
        wait_for(lambda: agent_line(srv) == "down #no healthy worker\n", what="down")
    finally:
        os.kill(first, signal.SIGCONT)
        os.kill(second, signal.SIGCONT)
    wait_for(lambda: agent_line(srv) == "up ready 100%\n", what="the weight back")
    slow = [background(srv.port, "/slow?2") for _ in range(8)]
    # 8 requests in flight over 2 workers: 67% split evenly, 75% all on one.
    wait_for(lambda: int(agent_line(srv).split()[2].rstrip("%")) <= 75,
             what="the weight to fall under load")
    for thread, _ in slow:
        thread.join(10)


def test_draining_host_is_not_ready_and_agent_says_drain(start_zion):
    srv = serve_hash(start_zion)
    slow, answers = background(srv.port, "/slow?2")
    wait_for(lambda: status(srv)["workers"][0]["inflight"] + status(srv)["workers"][1][
        "inflight"] == 1, what="the slow request in flight")
    srv.signal(signal.SIGTERM)
    wait_for(lambda: agent_line(srv) == "drain\n", what="the agent to say drain")
    assert admin_get(srv, "/ready") == (503, b"stopping\n")
    assert status(srv)["phase"] == "stopping"
    slow.join(10)
    assert answers and answers[0].startswith(b"HTTP/1.1 200")  # the drain finished it
    assert srv.proc.wait(15) == 0


def test_hostile_admin_clients_do_not_delay_supervision(start_zion):
    srv = serve_hash(start_zion)
    port = int(srv.wait_event("admin_listening")["port"])
    with contextlib.ExitStack() as hogs:
        for _ in range(40):
            sock = hogs.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
        with socket.create_connection(("127.0.0.1", port), timeout=5) as big:
            big.sendall(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n")
            assert big.recv(100).startswith(b"HTTP/1.1 431")
        victim = srv.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2
                 and srv.events("worker_died"), what="the worker replaced")
        # respawn_backoff is 0.1 s: the master did its job at once, hogs or not.
        assert time.monotonic() - killed < 2
        start = time.monotonic()
        assert agent_line(srv).startswith(("up ready", "down"))
        assert admin_get(srv, "/ready")[0] in (200, 503)
        assert time.monotonic() - start < 1


def test_admin_settings_errors_are_one_line(start_zion, zion_env):
    for flag, value in (("--admin", "nonsense"), ("--agent", "::1:80"), ("--admin", "h:99999")):
        proc = subprocess.run([sys.executable, "-m", "zion", "serve", flag, value],
                              capture_output=True, text=True, env=zion_env, cwd=APPS,
                              timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "admin." in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run([sys.executable, "-m", "zion", "serve", "--port", "0", "--agent",
                               busy], capture_output=True, text=True, env=zion_env, cwd=APPS,
                              timeout=30)
    assert proc.returncode == 1
    assert f"cannot bind the agent listener {busy}" in proc.stderr + proc.stdout


def test_admin_unknown_paths_are_404(start_zion):
    srv = serve_hash(start_zion, 1)
    for path in ("/nope", "/metrics/x", "/"):
        code, body = admin_get(srv, path)
        assert code == 404 and b"/metrics" in body


def holders(filter_args: list[str]) -> set[int]:
    out = subprocess.run(["ss", "-Hnp", *filter_args], capture_output=True, text=True,
                         check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_workers_hold_no_admin_socket(start_zion):
    """The master's admin sockets (listeners and a client's connection) are
    closed in every worker it forks, or a worker would keep them open."""
    srv = serve_hash(start_zion)
    port = int(srv.wait_event("admin_listening")["port"])
    agent = int(srv.wait_event("agent_listening")["port"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as pending:
        pending.sendall(b"GET /metrics HTTP/1.1\r\n")
        wait_for(lambda: holders(["-t", "state", "established", f"sport = :{port}"]),
                 what="the master to accept")
        victim = srv.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)  # its replacement forks while the connection is open
        wait_for(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2,
                 what="the worker replaced")
        assert holders(["-lt", f"sport = :{port}"]) == {srv.pid}
        assert holders(["-lt", f"sport = :{agent}"]) == {srv.pid}
        # No worker holds the client's connection. (The master itself may have
        # closed it by now: its 5 s per-connection deadline can pass while a
        # loaded machine boots the replacement; a leaked copy would outlive that.)
        assert holders(["-t", "state", "established", f"sport = :{port}"]) <= {srv.pid}


def test_reload_cannot_move_the_admin_listener(start_zion, tmp_path):
    cfg = tmp_path / "zion.toml"
    cfg.write_text('[admin]\nlisten = "127.0.0.1:0"\n')
    srv = start_zion("admin_app:app", "--config", str(cfg), "--no-bpf-demux")
    cfg.write_text('[admin]\nlisten = "127.0.0.2:0"\n')
    srv.signal(signal.SIGHUP)
    failed = srv.wait_event("reload_failed")
    assert "needs a restart" in failed["error"]
    assert admin_get(srv, "/ready") == (200, b"serving\n")
    assert total(metrics(srv), "zion_reload_failures_total") == 1
