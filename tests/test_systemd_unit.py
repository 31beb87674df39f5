"""config/zion.service, unchanged, under a real systemd: a cached Debian 12
root booted with systemd-nspawn -b (the capabilities and the bpf system
call allowed), zion installed the README's way (scripts/setup.sh, server
extras only) into /opt/zion, as the unit expects.

The root is built once with debootstrap from this machine's configured
Debian mirror and kept under /var/cache/zion-test/ (a first build takes
minutes; tests/support/nspawn_root.sh). Each run boots it through an overlay,
so the cached root stays clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for
from tests.support.bpf import cannot_load_bpf, zion_prog_ids

CACHE = Path("/var/cache/zion-test")
ROOT = CACHE / "bookworm"
BUILD_ROOT = REPO / "tests" / "support" / "nspawn_root.sh"
# This machine's pip configuration and CA bundle (a TLS-inspecting proxy may sit
# between it and PyPI), so set-up inside installs the way it does here.
PIP_PATHS = ["/etc/pip.conf", "/etc/xdg/pip", "/opt/wheels", "/opt/pypi", "/opt/pypi-more",
             "/etc/ssl/certs/ca-certificates.crt"]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (overlay mount, systemd-nspawn)"
    for tool in ("systemd-nspawn", "nsenter", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs the test extras)"
    if not (ROOT / ".zion-root-complete").exists() and shutil.which("debootstrap") is None:
        return "needs debootstrap to build the Debian root (scripts/setup.sh test extras)"
    return cannot_load_bpf()


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


class Machine:
    """A booted container: commands run in its namespaces (nsenter), or as
    a transient unit of its systemd (inside its seccomp filter and caps)."""

    def __init__(self, merged: Path, boot: subprocess.Popen[bytes]) -> None:
        self.merged = merged
        self.boot = boot
        self.init_pid = 0

    def sh(self, script: str, timeout: float = 60, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n",
                              "-p", "--", "/bin/sh", "-c", script], capture_output=True,
                             text=True, timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"{script!r} exited {out.returncode}:\n{out.stdout}\n"
                                 f"{out.stderr}")
        return out

    def unit_run(self, script: str, timeout: float = 600) -> str:
        return self.sh(f"systemd-run --wait --pipe --quiet --collect /bin/sh -c {_q(script)}",
                       timeout).stdout

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show -p {name} --value zion").stdout.strip()

    def journal(self, *args: str) -> list[dict[str, str]]:
        out = self.sh("journalctl -u zion -o json --no-pager " + " ".join(args)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def messages(self, *args: str) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal(*args)]


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _copy_checkout(dest: Path) -> None:
    """What a clone holds: the tracked files (and new ones not ignored)."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for name in filter(None, files):
        if name.split("/")[0] == ".venv":  # a symlinked venv is not ignored by `.venv/`
            continue
        src, dst = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    subprocess.run([str(BUILD_ROOT), str(ROOT)], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="zion-nspawn-"))
    upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ROOT},upperdir={upper},workdir={work}", str(merged)],
                   check=True, timeout=30)
    boot = None
    try:
        _copy_checkout(merged / "opt" / "zion")
        (CACHE / "pip").mkdir(exist_ok=True)
        binds = [f"--bind-ro={p}" for p in PIP_PATHS if os.path.exists(p)]
        # No host systemd (PID 1 here is not systemd): nspawn registers with no
        # machined and keeps to its own process (--register=no --keep-unit).
        boot = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--boot", "--directory", str(merged),
             "--register=no", "--keep-unit", "--console=passive",
             "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf",
             f"--bind={CACHE / 'pip'}:/root/.cache/pip", *binds],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        m = Machine(merged, boot)

        def booted() -> bool:
            assert boot.poll() is None, boot.stderr.read() if boot.stderr else ""
            # nspawn's child is first a helper, then the container's systemd
            try:
                kids = Path(f"/proc/{boot.pid}/task/{boot.pid}/children").read_text().split()
                inits = [int(k) for k in kids
                         if Path(f"/proc/{k}/comm").read_text().strip() == "systemd"]
            except OSError:
                return False
            if not inits:
                return False
            m.init_pid = inits[0]
            state = m.sh("systemctl is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, 180, "the container's boot", interval=0.5)
        # The README's way, for a server: set-up with no extras, then the unit.
        m.unit_run("cd /opt/zion && EXTRAS= ./scripts/setup.sh", timeout=900)
        m.sh("useradd --system --no-create-home --shell /usr/sbin/nologin zion && "
             "mkdir -p /etc/zion && cp /opt/zion/config/zion.service /etc/systemd/system/ && "
             "systemctl daemon-reload")
        yield m
    finally:
        if boot is not None and boot.poll() is None:
            boot.terminate()  # nspawn powers the container off
            try:
                boot.wait(60)
            except subprocess.TimeoutExpired:
                boot.kill()
                boot.wait(10)
        if boot is not None and boot.stderr is not None:
            boot.stderr.close()
        subprocess.run(["umount", "-l", str(merged)], check=False, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


# An app whose lifespan startup waits for a file: the workers are not ready,
# so READY=1 is not sent, until the test creates it.
GATE_APP = """
import asyncio, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                while not os.path.exists("/etc/zion/open"):
                    await asyncio.sleep(0.05)
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


def _config(m: Machine, port: int, extra: str = "") -> None:
    (m.merged / "etc" / "zion" / "gate_app.py").write_text(GATE_APP)
    (m.merged / "etc" / "zion" / "zion.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = 2\napp = "gate_app:app"\n'
        f'app_dir = "/etc/zion"\n{extra}')


def _curl_loop(port: int, stop: threading.Event, results: list[str]) -> None:
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                              "--max-time", "10", f"https://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=20, check=False)
        results.append(out.stdout.strip() or f"curl exit {out.returncode}")


@pytest.mark.timeout(2400)  # a first run builds the Debian root (debootstrap)
def test_the_shipped_unit_serves_with_the_demux_attached(machine):
    m, port = machine, _free_port()
    # EXTRAS= ./scripts/setup.sh: what serving needs, no test tools
    for pkg in ("chromium", "haproxy", "nghttp2-client", "systemd-container"):
        assert m.sh(f"dpkg -s {pkg}", check=False).returncode != 0, pkg
    assert m.sh("/opt/zion/.venv/bin/python -c 'import pytest'", check=False).returncode != 0
    kept = sorted(p.name for p in (m.merged / "opt/zion/zion/_data/objects").glob("*.json"))
    assert len(kept) == 6, kept  # set-up compiled every variant
    unit = (m.merged / "etc" / "systemd" / "system" / "zion.service").read_text()
    assert unit == (REPO / "config" / "zion.service").read_text()  # unchanged
    _config(m, port)
    gate = m.merged / "etc" / "zion" / "open"
    gate.unlink(missing_ok=True)
    m.sh("systemctl start --no-block zion")
    # Type=notify: listening, workers held in their lifespan startup, and the
    # unit still activating; active only once they are ready (READY=1)
    wait_for(lambda: any("event=listening" in x for x in m.messages()), 60, "listening")
    assert m.prop("ActiveState") == "activating"
    assert not any("event=workers_ready" in x for x in m.messages())
    gate.write_text("")
    wait_for(lambda: m.prop("ActiveState") == "active", 60, "active")
    assert any("event=workers_ready" in x for x in m.messages())
    text = "\n".join(m.messages())
    assert "bpf_demux=attached" in text, text
    attached = next(x for x in m.messages() if "bpf_demux=attached" in x)
    prog_id = int(attached.split("prog_id=")[1].split()[0])
    assert prog_id in zion_prog_ids()
    # the exposure score the docs give is what this systemd says of the unit
    score = m.sh("systemd-analyze security zion --no-pager").stdout
    found = re.search(r"Overall exposure level for zion\.service: ([\d.]+)", score)
    documented = re.search(r"`systemd-analyze security` rates it\s+([\d.]+)",
                           (REPO / "docs" / "deployment.md").read_text())
    assert found and documented and found.group(1) == documented.group(1), score[-300:]
    # journald got the priority prefix: info lines are not warnings
    assert not any("bpf_demux=attached" in x for x in m.messages("-p", "warning"))

    # two reloads under a bounded curl loop: not one failure
    stop, results = threading.Event(), []
    client = threading.Thread(target=_curl_loop, args=(port, stop, results))
    client.start()
    try:
        for n in (1, 2):
            wait_for(lambda n=n: len(results) >= 5 * n, 60, "requests before the reload")
            m.sh("systemctl reload zion")
            wait_for(lambda n=n: sum("event=reload_complete" in x for x in m.messages()) >= n,
                     90, f"reload {n}")
        count = len(results)
        wait_for(lambda: len(results) >= count + 5, 60, "requests after the reloads")
    finally:
        stop.set()
        client.join(30)
    assert results and all(r == "200" for r in results), results

    # kill -9 of the master: systemd restarts it (Restart=on-failure)
    pid = int(m.prop("MainPID"))
    m.sh("systemctl kill --kill-who=main --signal=KILL zion")
    wait_for(lambda: m.prop("ActiveState") == "active" and int(m.prop("MainPID")) not in
             (0, pid), 60, "the restarted master")
    assert int(m.prop("NRestarts")) >= 1
    ids = [int(x.split("prog_id=")[1].split()[0]) for x in m.messages()
           if "bpf_demux=attached" in x]

    # stop leaves no program of this unit loaded
    m.sh("systemctl stop zion", timeout=90)
    wait_for(lambda: not set(ids) & zion_prog_ids(), 30, "no program left")


@pytest.mark.timeout(600)
def test_with_no_kept_object_the_unit_compiles_past_protect_kernel_modules(machine):
    # ProtectKernelModules=yes makes /usr/lib/modules mode 000 for the service:
    # that probe is "not there", and the /usr/src headers are merged and used.
    m, port = machine, _free_port()
    _config(m, port)
    (m.merged / "etc" / "zion" / "open").write_text("")
    for obj in (m.merged / "opt/zion/zion/_data/objects").glob("*.json"):
        obj.unlink()
    m.sh("rm -rf /var/lib/zion/demux-objects /var/lib/zion/kernel-headers")
    since = len(m.messages())
    m.sh("systemctl start zion", timeout=180)
    lines = m.messages()[since:]
    attached = [x for x in lines if "bpf_demux=attached" in x]
    assert attached and "compiled now by bcc against merged linux-headers-" in attached[0], lines
    assert "kept in /var/lib/zion/demux-objects/" in attached[0]
    m.sh("systemctl stop zion", timeout=90)


@pytest.mark.timeout(600)
def test_an_unknown_config_key_exits_2_once_and_is_an_error_in_the_journal(machine):
    m = machine
    _config(m, _free_port(), "no_such_key = 1\n")
    m.sh("systemctl reset-failed zion; true")
    restarts = int(m.prop("NRestarts") or 0)
    m.sh("systemctl start zion", timeout=60, check=False)
    wait_for(lambda: m.prop("ActiveState") == "failed", 30, "the unit failed")
    assert m.prop("ExecMainStatus") == "2"
    # RestartPreventExitStatus=2: failed for good, no restart scheduled (a
    # restart would show SubState=auto-restart until RestartSec passes)
    assert m.prop("SubState") == "failed" and m.prop("Result") == "exit-code"
    assert int(m.prop("NRestarts") or 0) == restarts
    errors = "\n".join(m.messages("-p", "err"))
    assert "config error" in errors and "no_such_key" in errors, errors
