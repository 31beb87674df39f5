"""Compile once, load anywhere: the object bcc compiled is loaded by zion
with bpf(2) alone, where no kernel header and no bcc exist; one object
serves every configuration; a kept object that does not match is never
loaded blindly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, get
from tests.support.bpf import cannot_load_bpf, zion_prog_ids
from zion.demux import objects
from zion.demux.program import source_path

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))

OBJECT = "zion_demux-least-loaded-migrate.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> Path:
    """Every variant, compiled once the way scripts/setup.sh does."""
    dest = tmp_path_factory.mktemp("objects")
    out = subprocess.run([sys.executable, "-m", "zion.demux.objects", str(dest)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO),
                              "ZION_TLS_STATE_DIR": str(state_dir)})
    assert out.returncode == 0, out.stderr
    assert len(list(dest.glob("zion_demux-*.json"))) == 6, out.stdout
    return dest


def test_a_compile_where_bpf_is_refused_says_so_and_how_to_fix_it(tmp_path, state_dir):
    # a container build under its runtime's default seccomp profile: bcc only
    # said "Failed to compile BPF module <text>"
    out = subprocess.run([sys.executable, "-m", "tests.support.deny_bpf", sys.executable, "-m",
                          "zion.demux.objects", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO),
                              "ZION_TLS_STATE_DIR": str(state_dir)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the demux object was not compiled" in out.stderr
    assert "compiling needs bpf(), and here: bpf_syscall_refused" in out.stderr, out.stderr
    assert "--cap-add BPF --security-opt seccomp=" in out.stderr
    assert not list(tmp_path.glob("*.json"))


def _no_bcc(tmp_path: Path, zion_env: dict[str, str]) -> str:
    shim = tmp_path / "shim" / "bcc"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no bcc here (test)')\n")
    return os.pathsep.join([str(shim.parent), zion_env["PYTHONPATH"]])


async def _every_worker_gets_connections(port: int, workers: int) -> None:
    seen = {(await get(port, "/")).headers["x-zion-worker"] for _ in range(12 * workers)}
    assert seen == {str(i) for i in range(workers)}, seen


async def test_without_headers_or_bcc_the_kept_object_attaches_and_routes(
        start_zion, built, tmp_path, zion_env):
    srv = start_zion(workers=3, env={
        "ZION_DEMUX_OBJECTS": str(built), "PYTHONPATH": _no_bcc(tmp_path, zion_env),
        "ZION_DEMUX_KERNEL_HEADERS": str(tmp_path / "no-headers")})
    attached = srv.wait_event("demux_attached")
    assert attached["object"].startswith(f"kept object {built / OBJECT} (bcc "), attached
    assert attached["prog_id"] in zion_prog_ids()
    status = (await get(srv.port, "/_zion/status")).json()
    assert status["demux"]["state"] == "attached"
    await _every_worker_gets_connections(srv.port, 3)
    status = (await get(srv.port, "/_zion/status")).json()
    assert sum(s["dispatches"] for s in status["demux"]["workers"]) >= 36
    assert status["demux"]["fallbacks"] == 0


@pytest.mark.parametrize("workers, stall, beat", [(1, 40, 2), (4, 500, 20)])
async def test_one_object_serves_every_configuration(start_zion, built, tmp_path, workers,
                                                     stall, beat):
    before = (built / OBJECT).stat().st_mtime_ns
    cfg = tmp_path / "z.toml"
    cfg.write_text(f"[demux]\nstall_threshold_ms = {stall}\nheartbeat_interval_ms = {beat}\n")
    srv = start_zion("--config", str(cfg), workers=workers,
                     env={"ZION_DEMUX_OBJECTS": str(built)})
    attached = srv.wait_event("demux_attached")
    assert attached["object"].startswith("kept object"), attached
    assert attached["workers"] == workers and attached["stall_threshold_ms"] == stall
    await _every_worker_gets_connections(srv.port, workers)
    assert (built / OBJECT).stat().st_mtime_ns == before


def _copy(built: Path, dest: Path, edit=None) -> Path:
    dest.mkdir()
    for path in built.glob("*.json"):
        raw = json.loads(path.read_text())
        if edit is not None and path.name == OBJECT:
            edit(raw)
        (dest / path.name).write_text(json.dumps(raw))
    return dest


async def test_an_object_of_another_program_text_is_rebuilt(start_zion, built, tmp_path):
    def older(raw):
        raw["text_sha256"] = "0" * 64
    kept = _copy(built, tmp_path / "objects", older)
    srv = start_zion(workers=2, env={"ZION_DEMUX_OBJECTS": str(kept)})
    ignored = srv.wait_event("demux_object_ignored")
    assert "compiled from another program text (sha256 000000000000" in ignored["error"]
    attached = srv.wait_event("demux_attached")
    assert attached["object"].startswith("compiled now by bcc against "), attached
    assert attached["object"].endswith(f"kept in {kept / OBJECT}")
    source = source_path().read_text()
    assert json.loads((kept / OBJECT).read_text())["text_sha256"] == \
        objects.text_sha256(source, "least-loaded", True)


async def test_an_object_of_another_program_text_is_ignored_where_none_can_be_built(
        start_zion, built, tmp_path, zion_env):
    def older(raw):
        raw["text_sha256"] = "0" * 64
    kept = _copy(built, tmp_path / "objects", older)
    srv = start_zion(workers=2, env={
        "ZION_DEMUX_OBJECTS": str(kept), "PYTHONPATH": _no_bcc(tmp_path, zion_env)})
    assert "another program text" in srv.wait_event("demux_object_ignored")["error"]
    fallback = srv.wait_event("demux_fallback")
    assert fallback["reason"] == "no_bcc", fallback
    assert f"no usable compiled object ({kept / OBJECT})" in fallback["error"]
    assert (await get(srv.port, "/")).status == 200  # and it keeps serving


def test_an_object_the_kernel_refuses_is_rebuilt(start_zion, built, tmp_path):
    def broken(raw):
        import base64
        insns = bytearray(base64.b64decode(raw["insns"]))
        insns[-8:] = bytes([0xFF]) + bytes(7)  # no such opcode where `exit` was
        raw["insns"] = base64.b64encode(bytes(insns)).decode()
    kept = _copy(built, tmp_path / "objects", broken)
    srv = start_zion(workers=2, env={"ZION_DEMUX_OBJECTS": str(kept)})
    ignored = srv.wait_event("demux_object_ignored")
    assert f"the kernel refused {kept / OBJECT}: bpf(BPF_PROG_LOAD)" in ignored["error"]
    attached = srv.wait_event("demux_attached")
    assert attached["object"].startswith("compiled now by bcc"), attached


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare (util-linux) for a private mount namespace")
async def test_a_start_with_every_kernel_header_hidden_attaches(start_zion, built, tmp_path):
    # The default places: the package's objects, else the state directory's,
    # where a start that had headers kept it (here: copied from `built`).
    state = tmp_path / "state"
    shutil.copytree(built, state / "demux-objects")
    env = {"ZION_TLS_STATE_DIR": str(state)}
    (state / "kernel-headers").mkdir()
    hide = " && ".join(f"mount -t tmpfs zion-no-headers {p}" for p in
                       ("/lib/modules", "/usr/src", state / "kernel-headers"))
    check = ("test -z \"$(find /lib/modules /usr/src " + str(state / "kernel-headers") +
             " -mindepth 1 -print -quit)\" && test ! -e /sys/kernel/kheaders.tar.xz")
    wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f'{hide} && {check} && exec "$@"', "sh"]
    srv = start_zion(workers=2, env=env, wrapper=wrapper)
    attached = srv.wait_event("demux_attached")
    assert attached["bpf_demux"] == "attached"
    assert attached["object"].startswith("kept object"), attached
    await _every_worker_gets_connections(srv.port, 2)


def test_an_object_kept_by_root_under_umask_077_is_readable_by_the_service_user(state_dir):
    # `zion doctor` as root, from a shell with umask 077, compiles and keeps
    # the object; the service user (here nobody) must be able to read it.
    base = Path(tempfile.mkdtemp(prefix="zion-objects-"))
    try:
        os.chmod(base, 0o755)
        kept = base / "state" / "objects"
        out = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable, "-m",
                              "zion", "doctor"], capture_output=True, text=True, timeout=300,
                             check=False, cwd=base,
                             env={**os.environ, "PYTHONPATH": str(REPO),
                                  "ZION_TLS_STATE_DIR": str(state_dir),
                                  "ZION_DEMUX_OBJECTS": str(kept)})
        assert out.returncode == 0 and f"kept in {kept / OBJECT}" in out.stdout, out.stdout
        read = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "cat", str(kept / OBJECT)], capture_output=True, timeout=30,
                              check=False)
        assert read.returncode == 0, read.stderr
        assert json.loads(read.stdout)["mode"] == "least-loaded"
    finally:
        shutil.rmtree(base, ignore_errors=True)
