"""Workers keep no privilege: no capability in any set, no_new_privs, an
optional --user/--group, and no way into their master."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import APPS, get

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start workers as "
                                "root and to switch them to another user")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


async def test_a_root_started_worker_has_no_capability_and_cannot_reach_its_master(start_zion):
    srv = start_zion("introspect_app:app", workers=1)
    assert srv.events("workers_run_as_root")
    worker = _status(srv.worker_pids()[0])
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(worker[key], 16) == 0, (key, worker[key])
    assert worker["NoNewPrivs"] == "1"
    body = (await get(srv.port, "/")).body.decode()
    assert body.startswith("uid=0 ")
    assert "mem=PermissionError" in body and "ptrace=Operation not permitted" in body, body


async def test_user_and_group_switch_the_workers(start_zion):
    nobody = pwd.getpwnam("nobody")
    # The worker imports the app once it is nobody: from a directory nobody
    # can read, not from the checkout, which may sit under a private one
    # (mktemp -d makes 0700 directories).
    with tempfile.TemporaryDirectory() as apps:
        os.chmod(apps, 0o755)
        shutil.copy(APPS / "introspect_app.py", apps)
        srv = start_zion("introspect_app:app", "--user", "nobody", workers=1, cwd=Path(apps))
        assert not srv.events("workers_run_as_root")
        worker = _status(srv.worker_pids()[0])
        assert worker["Uid"].split()[0] == str(nobody.pw_uid)
        assert worker["Gid"].split()[0] == str(nobody.pw_gid)
        assert int(worker["CapBnd"], 16) == 0
        body = (await get(srv.port, "/")).body.decode()
        assert body.startswith(f"uid={nobody.pw_uid} ") and "ptrace=Operation not permitted" in body


def test_an_unknown_user_is_one_config_line(start_zion):
    srv = start_zion("--user", "no-such-user-here", ready=False)
    assert srv.proc.wait(20) == 2
    out = srv.log_text()
    assert "server.user (from command line): no such user" in out


@pytest.mark.skipif(shutil.which("capsh") is None,
                    reason="capsh is not installed (Debian package libcap2-bin)")
async def test_a_master_without_capabilities_is_still_out_of_its_workers_reach(start_zion):
    # Same uid, no capabilities on either side: only the master's
    # non-dumpable flag keeps a worker from reading or tracing it.
    wrapper = [shutil.which("capsh") or "capsh", "--drop=all", "--", "-c", 'exec "$0" "$@"']
    srv = start_zion("introspect_app:app", wrapper=wrapper, workers=1)
    body = (await get(srv.port, "/")).body.decode()
    assert "mem=PermissionError" in body and "ptrace=Operation not permitted" in body, body


async def test_the_master_keeps_only_what_it_still_needs(start_zion):
    srv = start_zion("raw_app:app", workers=1)
    master = _status(srv.pid)
    kept = int(master["CapEff"], 16)
    names = {5: "kill", 6: "setgid", 7: "setuid", 8: "setpcap", 10: "net_bind_service",
             21: "sys_admin", 38: "perfmon", 39: "bpf"}
    assert {names.get(bit, f"cap {bit}") for bit in range(64) if kept >> bit & 1} <= set(
        names.values())
    assert not kept >> 1 & 1 and not kept >> 19 & 1  # no dac_override, no sys_ptrace
    assert int(master["CapPrm"], 16) == kept  # gone for good, not just from the effective set
    # (tests/demux/test_compile_helper.py reloads such a master: the demux still loads)
