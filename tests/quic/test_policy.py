"""--http3 on a real `zion serve`: the master binds one UDP socket per worker
on the port and attaches the steering program (or says why not), workers
hold none of it, and boot never aborts because of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest
import structlog

from tests.conftest import REPO, get
from tests.support.bpf import BPFTOOL, bpftool_progs, cannot_load_bpf
from tests.support.h3client import h3_connect
from tests.support.serve import serve
from zion.demux.policy import DemuxOutcome
from zion.demux.reasons import DemuxState
from zion.listeners import ListenerGroup
from zion.quic.policy import bind_and_steer
from zion.settings import load_settings

needs_bpf = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))


def _udp_inodes(port: int) -> set[str]:
    """Socket inodes of the UDP sockets bound to `port` (/proc/net/udp{,6})."""
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(fields[9])
    return found


def _held(pid: int, inodes: set[str]) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            count += 1
    return count


@needs_bpf
async def test_http3_binds_a_udp_group_and_attaches_the_program(start_zion):
    srv = start_zion("--http3", workers=3)
    line = srv.wait_event("quic_steering_attached")
    assert line["bpf_quic"] == "attached" and line["workers"] == 3
    assert line["port"] == srv.port and line["initials"] == "least-loaded"
    progs = {p["id"]: p for p in bpftool_progs()}
    assert progs[line["prog_id"]]["type"] == "sk_reuseport"
    assert progs[line["prog_id"]]["name"] == "zion_quic", BPFTOOL
    assert srv.wait_event("http3_listening")["sockets"] == 3
    inodes = _udp_inodes(srv.port)
    assert len(inodes) == 3
    # The master holds the group; each worker holds its own socket of it
    # (the one it serves HTTP/3 on), none of the others'.
    assert _held(srv.pid, inodes) == 3
    assert all(_held(pid, inodes) == 1 for pid in srv.worker_pids())
    assert (await get(srv.port, "/")).status == 200
    assert srv.stop() == 0
    assert not _udp_inodes(srv.port)


async def test_http3_off_binds_no_udp(start_zion):
    srv = start_zion()
    response = await get(srv.port, "/")
    assert response.status == 200
    assert "alt-svc" not in response.headers  # nothing answers QUIC
    assert not _udp_inodes(srv.port)
    assert not srv.events("quic_steering_attached")


async def test_http3_without_the_demux_is_the_kernel_hash(start_zion, tmp_path):
    """And a reload that adds a worker carries the sockets over, with one
    more for the new slot (no program to keep generations apart)."""
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 2\n")
    srv = start_zion("h3_app:app", "--http3", "--no-bpf-demux", "--config", str(cfg),
                     workers=None)
    line = srv.wait_event("quic_steering_disabled")
    assert line["bpf_quic"] == "disabled" and line["using"] == "kernel reuseport hash"
    assert len(_udp_inodes(srv.port)) == 2
    assert (await get(srv.port, "/")).status == 200
    cfg.write_text("[server]\nworkers = 3\n")
    srv.signal(signal.SIGHUP)
    done = await asyncio.to_thread(srv.wait_event, "reload_complete", 120)
    assert len(done["pids"]) == 3
    assert len(_udp_inodes(srv.port)) == 3
    async with h3_connect(srv.port) as client:
        answer = await asyncio.wait_for(client.request("/"), 20)
    assert answer.status == 200 and int(answer.headers[b"x-pid"]) in done["pids"]


async def test_a_steering_failure_is_a_warning_not_a_stop(start_zion, tmp_path):
    srv = start_zion("--http3", env={"ZION_DEMUX_KERNEL_HEADERS": str(tmp_path / "none")})
    line = srv.wait_event("quic_steering_fallback")
    assert line["bpf_quic"] == "fallback" and line["reason"] and line["error"]
    assert line["using"] == "kernel reuseport hash"
    assert len(_udp_inodes(srv.port)) == 2
    assert (await get(srv.port, "/")).status == 200


def test_http3_with_no_tls_is_a_config_error(zion_env):
    out = subprocess.run([sys.executable, "-m", "zion", "serve", "--no-tls", "--http3",
                          "--port", "0"], cwd=REPO, env=zion_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "tls.http3" in out.stderr and "--no-tls" in out.stderr


def test_a_udp_port_held_elsewhere_costs_http3_only(tmp_path):
    """Another process on the UDP port (without SO_REUSEPORT): a warning and
    no HTTP/3, not a failed boot."""
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", 0))
    port = squatter.getsockname()[1]
    settings = load_settings(None, {"tls": {"state_dir": str(tmp_path), "http3": True}}, {})
    # Only its address and count matter here.
    unbound = (socket.socket(), socket.socket())
    tcp = ListenerGroup(unbound, "127.0.0.1", port, socket.AF_INET)
    try:
        with structlog.testing.capture_logs() as logs:
            assert bind_and_steer(settings, tcp, DemuxOutcome(DemuxState.DISABLED, "hash")) is None
        assert [e["event"] for e in logs] == ["quic_bind_failed"]
        assert "udp 127.0.0.1" in logs[0]["error"] and logs[0]["http3"] == "off"
    finally:
        squatter.close()
        tcp.close()


@needs_bpf
async def test_a_reload_lets_old_workers_finish_their_quic_connections(start_zion, tmp_path):
    """SIGHUP while an HTTP/3 request is held open: the new generation gets
    its own UDP sockets, the old worker keeps its own and answers the held
    request on the same connection (carried over on one socket, the new
    worker would take its packets and reset it), new connections go to the
    new workers."""
    srv = serve(start_zion, "h3_app:app", "--http3", workers=2)
    release = tmp_path / "release"
    old_pids = set(srv.worker_pids())
    async with h3_connect(srv.port) as old_client:
        held = asyncio.ensure_future(old_client.request(f"/hold?{release}"))
        token = old_client.reset_token
        srv.signal(signal.SIGHUP)
        done = await asyncio.to_thread(srv.wait_event, "reload_complete", 120)
        new_pids = set(done["pids"])
        assert not new_pids & old_pids
        async with h3_connect(srv.port) as new_client:
            fresh = await asyncio.wait_for(new_client.request("/"), 30)
        release.touch()
        answer = await asyncio.wait_for(held, 30)
    assert answer.status == 200 and answer.body.startswith(b"3 GET 0 ")
    assert int(answer.headers[b"x-pid"]) in old_pids  # served to the end by the old worker
    # No new worker saw its packets (aioquic's client ignores stateless
    # resets, so it would have gone on with the old worker's half of them).
    assert not [d for d in old_client.datagrams if d.endswith(token)]
    assert fresh.status == 200 and int(fresh.headers[b"x-pid"]) in new_pids


@needs_bpf
async def test_a_reload_that_changes_the_worker_count_keeps_old_quic_connections(start_zion,
                                                                                tmp_path):
    """2 -> 3 workers by SIGHUP while an HTTP/3 request is held: the program
    is compiled for a worker count, so the reload loads one for three on
    the same maps (the old generation's sockets stay in its sockarray) and
    swaps it in at commit. The old worker answers the held request on its
    connection, no stateless reset reaches the client, and new connections
    go to the three new workers."""
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 2\n")
    srv = serve(start_zion, "h3_app:app", "--http3", "--config", str(cfg), workers=None)
    assert srv.wait_event("quic_steering_attached")["workers"] == 2
    release = tmp_path / "release"
    old_pids = set(srv.worker_pids())
    async with h3_connect(srv.port) as old_client:
        held = asyncio.ensure_future(old_client.request(f"/hold?{release}"))
        token = old_client.reset_token
        cfg.write_text("[server]\nworkers = 3\n")
        srv.signal(signal.SIGHUP)
        done = await asyncio.to_thread(srv.wait_event, "reload_complete", 120)
        new_pids = set(done["pids"])
        assert len(new_pids) == 3 and not new_pids & old_pids
        swapped = srv.events("quic_steering_attached")
        assert [e["workers"] for e in swapped] == [2, 3]
        assert swapped[-1]["generation"] == 1
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(h3_connect(srv.port)) for _ in range(3)]
            fresh = await asyncio.wait_for(
                asyncio.gather(*(c.request("/") for c in clients)), 30)
        release.touch()
        answer = await asyncio.wait_for(held, 30)
    assert answer.status == 200 and int(answer.headers[b"x-pid"]) in old_pids
    assert not [d for d in old_client.datagrams if d.endswith(token)]
    assert all(f.status == 200 for f in fresh)
    # Least-loaded admission over the new board: three connections, three workers.
    assert {int(f.headers[b"x-pid"]) for f in fresh} == new_pids
