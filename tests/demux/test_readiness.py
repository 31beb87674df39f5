"""`zion doctor`: the trial load, what it says and how to fix it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import APPS, REPO
from tests.support.bpf import UNCHECKED_PACKET_READ, cannot_load_bpf

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
CAPSH = shutil.which("capsh")


def _doctor(*args: str, wrapper: list[str] | None = None, env: dict | None = None):
    return subprocess.run([*(wrapper or []), sys.executable, "-m", "zion", "doctor", *args],
                          capture_output=True, text=True, timeout=120, cwd=APPS,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_doctor_ready_and_prints_program(state_dir):
    result = _doctor("--ebpf", "--workers", "3", env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bpf_demux: ready")
    assert "#define ZION_MODE 1 /* least-loaded */" in result.stdout
    assert "  object:        " in result.stdout
    assert "int zion_demux(struct sk_reuseport_md *md)" in result.stdout


@pytest.mark.skipif(CAPSH is None, reason="capsh is not installed (Debian package libcap2-bin)")
def test_doctor_says_why_and_how_to_fix(state_dir):
    result = _doctor("--json", wrapper=[CAPSH, "--drop=cap_bpf,cap_sys_admin", "--", "-c",
                                        'exec "$0" "$@"'],
                     env={"ZION_TLS_STATE_DIR": str(state_dir)})
    # capsh --drop takes them out of the bounding set: nothing here can get them
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["bpf_demux"] == "cap_bpf_not_in_bounding_set", report
    for fix in ("AmbientCapabilities=CAP_BPF", "--capability=CAP_BPF,CAP_PERFMON "
                "--system-call-filter=bpf", "--cap-add BPF --security-opt seccomp=",
                "capabilities: {add: [BPF]}"):
        assert fix in report["fix"], report["fix"]


def test_doctor_tells_a_capability_not_effective_from_one_not_bounded(state_dir):
    # nobody keeps the full bounding set but has nothing effective
    result = _doctor("--json", wrapper=["setpriv", "--reuid=65534", "--regid=65534",
                                        "--clear-groups"],
                     env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["bpf_demux"] == "no_capability", report
    assert "bounding set but not effective" in report["fix"]
    assert "cap_bpf=bounding-only" in report["capabilities"]


def test_doctor_tells_bpf_refused_by_seccomp_while_cap_bpf_is_effective(state_dir):
    result = _doctor("--json", wrapper=[sys.executable, "-m", "tests.support.deny_bpf"],
                     env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["bpf_demux"] == "bpf_syscall_refused", report
    assert report["reason"] == "bpf_syscall_refused", report  # what the boot line says
    assert "EPERM with cap_bpf effective (seccomp: filter" in report["detail"]
    assert "cap_bpf=effective" in report["capabilities"]
    assert "--system-call-filter=bpf" in report["fix"]
    assert "seccompProfile" in report["fix"]


def test_doctor_prints_the_program_even_when_the_verifier_rejects_it(state_dir, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text(UNCHECKED_PACKET_READ)
    result = _doctor("--ebpf", env={"ZION_TLS_STATE_DIR": str(state_dir),
                                    "ZION_DEMUX_PROGRAM": str(bad)})
    assert result.returncode == 1
    assert result.stdout.startswith("bpf_demux: probe_failed")
    assert "reason:        verifier_rejected" in result.stdout
    assert "return p[40];" in result.stdout and "#define ZION_MODE" in result.stdout


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_doctor_tells_a_user_namespace_from_a_seccomp_filter(state_dir):
    # rootless Podman: CapEff says cap_bpf, bpf() says EPERM, and no seccomp
    # profile can change that
    result = _doctor("--json", wrapper=["unshare", "--user", "--map-root-user"],
                     env={"ZION_TLS_STATE_DIR": str(state_dir)})
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["bpf_demux"] == "cap_bpf_in_user_namespace", report
    assert report["reason"] == "no_capability", report
    assert "uid_map 0 0 1" in report["detail"], report
    assert "rootful" in report["fix"]
