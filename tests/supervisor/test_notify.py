"""sd_notify against a real NOTIFY_SOCKET, and the unit file."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess

import pytest

from tests.conftest import REPO, wait_for


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[str] = []

    def received() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    yield path, received
    sock.close()


def test_ready_reloading_stopping(start_zion, notify_socket):
    path, received = notify_socket
    srv = start_zion("starlette_app:app", env={"NOTIFY_SOCKET": str(path)})
    # READY=1 comes after the workers_ready line: every worker accepts by then.
    ready = wait_for(lambda: [m for m in received() if "READY=1" in m], 10, "READY=1")
    assert "STATUS=serving" in ready[0]
    srv.signal(signal.SIGHUP)
    wait_for(lambda: any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in received()),
             10, "RELOADING=1")
    srv.wait_event("reload_complete")
    wait_for(lambda: sum("READY=1" in m for m in received()) >= 2, 10, "READY=1 again")
    assert srv.stop() == 0
    wait_for(lambda: any("STOPPING=1" in m for m in received()), 10, "STOPPING=1")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_unit_file_verifies(tmp_path):
    unit = (REPO / "config" / "zion.service").read_text()
    # verify checks ExecStart exists; point it at this checkout's binary.
    unit = unit.replace("/opt/zion/.venv/bin/zion", str(REPO / ".venv" / "bin" / "zion"))
    target = tmp_path / "zion.service"
    target.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(target)],
                            capture_output=True, text=True, timeout=60)
    problems = [ln for ln in result.stderr.splitlines()
                if "zion.service" in ln and "No such file" not in ln
                and "user" not in ln.lower() and "group" not in ln.lower()]
    assert not problems, result.stderr
    for key in ("Type=notify", "ExecReload=/bin/kill -s HUP $MAINPID", "KillMode=mixed",
                "NoNewPrivileges=yes", "ProtectSystem=strict", "CAP_BPF",
                "CAP_NET_BIND_SERVICE"):
        assert key in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_unit_exposure_stays_low():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true",
                             str(REPO / "config" / "zion.service")],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for zion\.service: ([\d.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    # 3.6 before SystemCallFilter, ProtectKernelTunables, ProtectProc, UMask, RemoveIPC
    assert float(found.group(1)) <= 2.0
