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


def test_doctor_prints_the_program_even_when_the_verifier_rejects_it(state_dir, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text(UNCHECKED_PACKET_READ)
    result = _doctor("--ebpf", env={"ZION_TLS_STATE_DIR": str(state_dir),
                                    "ZION_DEMUX_PROGRAM": str(bad)})
    assert result.returncode == 1
    assert result.stdout.startswith("bpf_demux: probe_failed")
    assert "reason:        verifier_rejected" in result.stdout
    assert "return p[40];" in result.stdout and "#define ZION_WORKERS" in result.stdout
