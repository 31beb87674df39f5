"""scripts/seccomp_allow_bpf.py on the two profile layouts it is given:
containers-common's (Podman: an allow rule with CAP_SYS_ADMIN, an EPERM rule
without it) and moby's (allow rules per capability). The Podman container
that attaches with its output is tests/deploy/test_podman.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "seccomp_allow_bpf.py"
_spec = importlib.util.spec_from_file_location("seccomp_allow_bpf", SCRIPT)
assert _spec is not None and _spec.loader is not None
allow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(allow)

PODMAN = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [
    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
    {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ALLOW",
     "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
     "excludes": {"caps": ["CAP_SYS_ADMIN"]}}]}
MOBY = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
    {"names": ["bpf", "mount"], "action": "SCMP_ACT_ALLOW",
     "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}}]}


def _naming_bpf(profile: dict) -> list[dict]:
    return [r for r in profile["syscalls"] if "bpf" in r["names"]]


def test_bpf_gets_one_unconditional_allow_and_every_other_rule_stays():
    for given in (PODMAN, MOBY):
        out = allow.allow_bpf(given)
        assert _naming_bpf(out) == [{"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "args": []}]
        assert {k: v for k, v in out.items() if k != "syscalls"} == \
            {k: v for k, v in given.items() if k != "syscalls"}
        others = [dict(r, names=[n for n in r["names"] if n != "bpf"])
                  for r in given["syscalls"]]
        assert out["syscalls"][:-1] == [r for r in others if r["names"]]


def test_the_command_line_reads_a_file_or_stdin(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PODMAN))
    for args, stdin in (([str(path)], None), (["-"], json.dumps(PODMAN))):
        out = subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin,
                             capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(out.stdout) == allow.allow_bpf(PODMAN)
