"""The SK_REUSEPORT demux on the real kernel: attach, route, count, fall back, clean up.

Needs root (or CAP_BPF) and Debian's bcc; CI runs as root, so these run there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import structlog

from tests.conftest import APPS, REPO, get, wait_for
from zion import caps
from zion.bpf_demux import SkReuseport, object_path, setup_demux
from zion.config import load_settings
from zion.errors import DemuxError
from zion.listeners import ListenerGroup


def _can_load_bpf() -> str | None:
    have = caps.effective()
    if caps.CAP_BPF not in have and caps.CAP_SYS_ADMIN not in have:
        return "needs CAP_BPF or CAP_SYS_ADMIN (run as root)"
    try:
        from zion.bpf_demux import import_bcc
        import_bcc()
    except DemuxError as exc:
        return f"needs Debian's python3-bpfcc ({exc.detail})"
    return None


pytestmark = pytest.mark.skipif(_can_load_bpf() is not None, reason=str(_can_load_bpf()))
CAPSH = shutil.which("capsh")
BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"


def bpftool_progs() -> list[dict]:
    out = subprocess.run([BPFTOOL, "-j", "prog", "list"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out)


def zion_prog_ids() -> set[int]:
    return {p["id"] for p in bpftool_progs()
            if p.get("type") == "sk_reuseport" and p.get("name") == "zion_demux"}


def prog_fds(pid: int) -> int:
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            if "prog_id:" in info.read_text():
                count += 1
        except OSError:
            pass
    return count


async def test_attach_logs_bpftool_shows_and_every_worker_gets_connections(start_zion):
    srv = start_zion(workers=4)
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
    # Every accepted connection went through the program: the 400 and this one.
    assert dispatched == total + 1, slots
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
    before = zion_prog_ids()
    ids = []
    for _ in range(10):
        srv = start_zion(workers=2)
        ids.append(srv.wait_event("demux_attached")["prog_id"])
        assert srv.stop() == 0
    assert not (set(ids) & zion_prog_ids()), "a stopped server left its program loaded"
    assert zion_prog_ids() <= before


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


async def test_fallback_when_bcc_does_not_import(start_zion, tmp_path, zion_env):
    shim = tmp_path / "shim" / "bcc"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('libbcc.so.0: cannot open (test)')\n")
    path = os.pathsep.join([str(shim.parent), zion_env["PYTHONPATH"]])
    srv = start_zion(env={"PYTHONPATH": path})
    await assert_fallback(srv, "no_bcc")


async def test_fallback_without_kernel_headers(start_zion, tmp_path):
    srv = start_zion(env={"ZION_DEMUX_KERNEL_HEADERS": str(tmp_path / "no-headers")})
    await assert_fallback(srv, "no_kernel_headers")


async def test_fallback_when_verifier_rejects(start_zion, tmp_path):
    bad = tmp_path / "bad.c"
    # Dereferences packet memory without a bounds check: the verifier says no.
    bad.write_text(
        "#include <uapi/linux/bpf.h>\n"
        "BPF_F_TABLE(\"array\", u32, u64, zion_slots, ZION_WORKERS + 1, BPF_F_MMAPABLE);\n"
        "int zion_demux(struct sk_reuseport_md *md) {\n"
        "    char *p = (char *)(long)md->data;\n"
        "    return p[40];\n"
        "}\n")
    srv = start_zion(env={"ZION_DEMUX_PROGRAM": str(bad)})
    await assert_fallback(srv, "verifier_rejected")
    assert "Failed to load BPF program" in srv.wait_event("demux_fallback")["error"]


async def test_disabled_by_flag_loads_nothing(start_zion):
    before = zion_prog_ids()
    srv = start_zion("--no-bpf-demux")
    line = srv.wait_event("demux_disabled")
    assert line["bpf_demux"] == "disabled" and line["reason"] == "flag"
    assert prog_fds(srv.pid) == 0 and zion_prog_ids() == before
    assert (await get(srv.port, "/")).status == 200


async def test_disabled_by_config(start_zion, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[demux]\nenabled = false\n")
    srv = start_zion("--config", str(cfg))
    line = srv.wait_event("demux_disabled")
    assert line["reason"] == "flag" and line["source"] == str(cfg)


def test_attach_to_socket_outside_a_reuseport_group(state_dir):
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    settings = load_settings(None, {"server": {"workers": 1},
                                    "tls": {"state_dir": str(state_dir)}}, {})
    from zion.bpf_demux import preflight
    shim = SkReuseport(1, kernel_source=preflight(settings))
    try:
        with pytest.raises(DemuxError) as info:
            shim.attach(plain)
        assert info.value.reason == "attach_failed"
        assert "not in a SO_REUSEPORT group" in info.value.detail
    finally:
        shim.close()
    # The boot wiring turns the same failure into a fallback, not an exception.
    group = ListenerGroup((plain,), "127.0.0.1", plain.getsockname()[1], socket.AF_INET)
    with structlog.testing.capture_logs() as logs:
        outcome = setup_demux(settings, group)
    plain.close()
    assert outcome.state == "fallback" and outcome.reason == "attach_failed"
    assert logs[-1]["bpf_demux"] == "fallback" and logs[-1]["log_level"] == "warning"


# -- doctor and packaging ------------------------------------------------------------------


def _doctor(*args: str, wrapper: list[str] | None = None, env: dict | None = None):
    return subprocess.run([*(wrapper or []), sys.executable, "-m", "zion", "doctor", *args],
                          capture_output=True, text=True, timeout=120, cwd=APPS,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_doctor_ready_and_prints_program(state_dir):
    result = _doctor("--ebpf", "--workers", "3", env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bpf_demux: ready")
    assert "#define ZION_WORKERS 3" in result.stdout
    assert "int zion_demux(struct sk_reuseport_md *md)" in result.stdout


@pytest.mark.skipif(CAPSH is None, reason="capsh is not installed (Debian package libcap2-bin)")
def test_doctor_says_why_and_how_to_fix(state_dir):
    result = _doctor("--json", wrapper=[CAPSH, "--drop=cap_bpf,cap_sys_admin", "--", "-c",
                                        'exec "$0" "$@"'],
                     env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["bpf_demux"] == "no_capability" and "CAP_BPF" in report["fix"]


def test_program_ships_in_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("zion-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("zion/_data/zion_demux.c")
        config = zf.read("zion/_data/zion.toml")
        zf.extractall(tmp_path / "installed")
    assert shipped == (REPO / "bpf" / "zion_demux.c").read_bytes()
    assert config == (REPO / "config" / "zion.toml").read_bytes()
    out = subprocess.run([sys.executable, "-c", "from zion.bpf_demux import object_path;"
                          "p = object_path(); print(p, p.is_file())"],
                         capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}).stdout
    assert out.strip() == f"{tmp_path / 'installed' / 'zion' / '_data' / 'zion_demux.c'} True"
    assert object_path().read_text() == shipped.decode()
