"""The demux through a booted server on the real kernel: attach, route,
count, fall back with the reason, clean up.

Needs root (or CAP_BPF) and Debian's bcc; CI runs as root, so these run there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys

import pytest

from tests.admin.support import admin_get
from tests.conftest import REPO, get, wait_for
from tests.support.bpf import UNCHECKED_PACKET_READ, cannot_load_bpf, prog_fds, zion_prog_ids

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
CAPSH = shutil.which("capsh")


async def test_attach_logs_bpftool_shows_and_every_worker_gets_connections(start_zion):
    srv = start_zion("--admin", "127.0.0.1:0", workers=4)
    attached = srv.wait_event("demux_attached")
    assert attached["bpf_demux"] == "attached" and isinstance(attached["fd"], int)
    assert attached["mode"] == "least-loaded"
    assert attached["prog_id"] in zion_prog_ids()
    total = 400
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            return (await get(srv.port, "/")).headers["x-zion-worker"]

    seen = await asyncio.gather(*(one() for _ in range(total)))
    per_worker = {w: seen.count(w) for w in set(seen)}
    assert set(per_worker) == {"0", "1", "2", "3"}, per_worker
    status = (await get(srv.port, "/_zion/status")).json()
    slots = status["demux"]["workers"]
    dispatched = sum(s["dispatches"] for s in slots)
    # Every accepted connection went through the program: the 400 and this
    # one. On a loaded machine a worker may be seen blocked and its queue
    # moved; each moved connection runs the program again (as a migration).
    _, body = admin_get(srv, "/status")
    requeued = sum(w["requeued"] for w in json.loads(body)["workers"])
    assert total + 1 <= dispatched <= total + 1 + requeued, (slots, requeued)
    assert status["demux"]["fallbacks"] == 0
    for slot in slots:
        assert slot["dispatches"] >= per_worker[str(slot["worker"])]


def test_logfmt_line_is_literal(start_zion):
    srv = start_zion("--log-format", "logfmt", ready=False)
    text = wait_for(lambda: "event=workers_ready" in srv.log_text() and srv.log_text(), 30,
                    "workers_ready")
    assert re.search(r"bpf_demux=attached fd=\d+ prog_id=\d+ mode=least-loaded", text), text


@pytest.mark.parametrize("mode", ["hash", "cpu"])
async def test_other_modes_attach_and_route(start_zion, mode):
    srv = start_zion("--demux", mode, workers=2)
    assert srv.wait_event("demux_attached")["mode"] == mode
    for _ in range(20):
        assert (await get(srv.port, "/")).status == 200
    status = (await get(srv.port, "/_zion/status")).json()
    assert sum(s["dispatches"] for s in status["demux"]["workers"]) == 21


def test_no_programs_left_after_ten_cycles(start_zion):
    ids = []
    for _ in range(10):
        srv = start_zion(workers=2)
        ids.append(srv.wait_event("demux_attached")["prog_id"])
        assert srv.stop() == 0
    # (Only this test's programs: other processes on the machine may load theirs.)
    assert not (set(ids) & zion_prog_ids()), "a stopped server left its program loaded"


# -- fallbacks: each boots, serves, and says why ------------------------------------


async def assert_fallback(srv, reason: str) -> None:
    line = srv.wait_event("demux_fallback")
    assert line["bpf_demux"] == "fallback" and line["reason"] == reason, line
    assert line["level"] == "warning"
    assert (await get(srv.port, "/")).status == 200
    status = (await get(srv.port, "/_zion/status")).json()
    assert status["demux"]["state"] == "fallback" and status["demux"]["reason"] == reason
    assert prog_fds(srv.pid) == 0


@pytest.mark.skipif(CAPSH is None, reason="capsh is not installed (Debian package libcap2-bin)")
async def test_fallback_without_capabilities(start_zion):
    wrapper = [CAPSH, "--drop=cap_bpf,cap_sys_admin", "--", "-c", 'exec "$0" "$@"']
    srv = start_zion(wrapper=wrapper)
    await assert_fallback(srv, "no_capability")


async def test_fallback_when_a_seccomp_filter_refuses_bpf_says_so(start_zion):
    # Podman's default profile with --cap-add BPF: the capability is there, the
    # call is not (tests/deploy/test_podman.py runs that container itself)
    srv = start_zion(wrapper=[sys.executable, "-m", "tests.support.deny_bpf"],
                     env={"PYTHONPATH": str(REPO)})
    await assert_fallback(srv, "bpf_syscall_refused")
    assert "BPF_MAP_CREATE" in srv.wait_event("demux_fallback")["error"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
async def test_fallback_in_a_user_namespace_is_no_capability_and_names_it(start_zion):
    # a rootless container: every capability effective, none in the initial namespace
    srv = start_zion(wrapper=["unshare", "--user", "--map-root-user"])
    await assert_fallback(srv, "no_capability")
    assert "only in a user namespace" in srv.wait_event("demux_fallback")["error"]


async def test_fallback_when_bcc_does_not_import(start_zion, tmp_path, zion_env):
    shim = tmp_path / "shim" / "bcc"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('libbcc.so.0: cannot open (test)')\n")
    path = os.pathsep.join([str(shim.parent), zion_env["PYTHONPATH"]])
    # no compiled object kept either (an empty objects directory)
    srv = start_zion(env={"PYTHONPATH": path, "ZION_DEMUX_OBJECTS": str(tmp_path / "none")})
    await assert_fallback(srv, "no_bcc")
    assert "no usable compiled object" in srv.wait_event("demux_fallback")["error"]


async def test_fallback_without_kernel_headers(start_zion, tmp_path):
    srv = start_zion(env={"ZION_DEMUX_KERNEL_HEADERS": str(tmp_path / "no-headers"),
                          "ZION_DEMUX_OBJECTS": str(tmp_path / "none")})
    await assert_fallback(srv, "no_kernel_headers")


async def test_fallback_when_verifier_rejects(start_zion, tmp_path):
    bad = tmp_path / "bad.c"
    # Dereferences packet memory without a bounds check: the verifier says no.
    bad.write_text(UNCHECKED_PACKET_READ)
    srv = start_zion(env={"ZION_DEMUX_PROGRAM": str(bad)})
    await assert_fallback(srv, "verifier_rejected")
    # the verifier's own words, from bpf(BPF_PROG_LOAD)'s log
    error = srv.wait_event("demux_fallback")["error"]
    assert "bpf(BPF_PROG_LOAD)" in error and "outside of the packet" in error, error


async def test_disabled_by_flag_loads_nothing(start_zion):
    srv = start_zion("--no-bpf-demux")
    line = srv.wait_event("demux_disabled")
    assert line["bpf_demux"] == "disabled" and line["reason"] == "flag"
    # Nothing of this server holds a program (other processes on the machine may).
    assert all(prog_fds(pid) == 0 for pid in (srv.pid, *srv.worker_pids()))
    assert (await get(srv.port, "/")).status == 200


async def test_disabled_by_config(start_zion, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[demux]\nenabled = false\n")
    srv = start_zion("--config", str(cfg))
    line = srv.wait_event("demux_disabled")
    assert line["reason"] == "flag" and line["source"] == str(cfg)
