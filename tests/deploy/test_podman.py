"""zion in a real OCI container, as users deploy it: rootful Podman (Debian
12's 4.3, runc), its default seccomp profile and capabilities, and an image
with no kernel headers, no bcc and no LLVM, so the demux can only come from
the object scripts/setup.sh compiled into zion/_data/objects.

The image is the Debian root tests/test_systemd_unit.py boots
(tests/support/nspawn_root.sh, built once under /var/cache/zion-test/),
imported once into Podman's store with the headers, bcc and LLVM purged.
This checkout and its venv are bind-mounted read-only at their own paths (a
venv copied in); tests/test_systemd_unit.py covers installing with
scripts/setup.sh. For each way of running the container: what `zion serve`
logs (attached, or the fallback reason), that it serves HTTPS, what `zion
doctor` says inside it, and that `podman stop` ends it cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for
from tests.support.bpf import zion_prog_ids

ROOT = Path("/var/cache/zion-test/bookworm")
BUILD_ROOT = REPO / "tests" / "support" / "nspawn_root.sh"
OBJECTS = REPO / "zion" / "_data" / "objects"
DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
# Purged from the imported root: what compiles the demux, and what it reads.
IMAGE_RECIPE = (
    "apt-get purge -y -qq 'linux-headers-*' 'linux-kbuild-*' 'linux-compiler-*' python3-bpfcc "
    "'libbpfcc*' bpftool 'libllvm*' 'libclang*' >/dev/null && "
    "apt-get autoremove -y -qq --purge >/dev/null && rm -rf /usr/lib/modules /usr/src/*")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (rootful podman)"
    for tool in ("podman", "runc", "bpftool"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs the test extras)"
    if not DEFAULT_PROFILE.exists():
        return f"needs Podman's default seccomp profile {DEFAULT_PROFILE} (containers-common)"
    if not (OBJECTS / "zion_demux-least-loaded-migrate.json").exists():
        return f"needs the compiled demux objects in {OBJECTS} (scripts/setup.sh as root)"
    if not (ROOT / ".zion-root-complete").exists() and shutil.which("debootstrap") is None:
        return "needs debootstrap to build the Debian root (scripts/setup.sh test extras)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _podman(*args: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    # runc: Debian 12's crun 1.8 refuses a host with cgroup v1 controllers and a
    # cgroup2 mount holding one ("cgroups in hybrid mode not supported")
    out = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                         text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... exited {out.returncode}:\n"
                             f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def _ulimits() -> list[str]:
    # Podman raises nofile and nproc to 1M/4M, which needs CAP_SYS_RESOURCE;
    # a host root without it (this VM) gets EPERM from the runtime: keep ours.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built once per root and recipe (kept in Podman's store)."""
    subprocess.run([str(BUILD_ROOT), str(ROOT)], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    stamp = f"{(ROOT / '.zion-root-complete').stat().st_mtime_ns}\n{IMAGE_RECIPE}"
    tag = f"localhost/zion-test/noheaders:{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    if _podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    base = tag.replace("/noheaders:", "/root:")
    tar = subprocess.Popen(["tar", "-C", str(ROOT), "-c", "--exclude=./.zion-root-complete",
                            "."], stdout=subprocess.PIPE)
    try:
        imported = subprocess.run(["podman", "import", "--quiet", "-", base], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600, check=False)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)
    assert imported.returncode == 0, imported.stderr
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Containerfile").write_text(f"FROM {base}\nRUN {IMAGE_RECIPE}\n")
        _podman("build", "--network", "none", *_ulimits(), "-t", tag, ctx, timeout=600)
    _podman("rmi", base, check=False)
    return tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mounts() -> list[str]:
    """This checkout, its venv and the venv's interpreter, read-only where
    they are here (the venv's paths are absolute)."""
    paths = {REPO, Path(sys.prefix).resolve()}
    base = Path(sys.base_prefix).resolve()
    if not str(base).startswith("/usr"):  # a Debian python is the image's own
        paths.add(base)
    return [f"--volume={p}:{p}:ro" for p in sorted(paths)]


class Run:
    def __init__(self, out: Path, port: int, name: str) -> None:
        self.out, self.port, self.name = out, port, name

    def lines(self) -> list[dict]:
        try:
            text = (self.out / "serve.log").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def event(self, name: str) -> dict | None:
        return next((x for x in self.lines() if x.get("event") == name), None)

    def doctor(self) -> dict:
        return json.loads((self.out / "doctor.json").read_text())

    def get(self) -> int:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/", context=ctx,
                                        timeout=5) as resp:
                return int(resp.status)
        except OSError:
            return 0


# What the container runs: what it holds of the compile chain, the doctor's
# verdict, then zion as PID 1 (podman stop sends it SIGTERM).
SCRIPT = """
{{ ls -A /usr/src; ls -d /usr/lib/modules /lib/modules; command -v clang;
   python3 -c 'import bcc'; }} > /out/compile-chain 2>/dev/null
{zion} doctor --json > /out/doctor.json 2>/out/doctor.err
exec {zion} serve --host 127.0.0.1 --port {port} --workers 2 --log-format json \
    --app-dir {apps} raw_app:app > /out/serve.log 2>&1
"""


@pytest.fixture
def run_container(image: str, tmp_path: Path) -> Iterator:
    names: list[str] = []

    def run(*flags: str) -> Run:
        out = tmp_path / f"out{len(names)}"
        out.mkdir()
        out.chmod(0o777)  # the container's root may be another uid (--uidmap)
        port = _free_port()
        name = f"zion-test-{os.getpid()}-{len(names)}"
        names.append(name)
        script = SCRIPT.format(zion=Path(sys.prefix) / "bin" / "zion", port=port,
                               apps=REPO / "tests" / "apps")
        _podman("run", "--detach", "--name", name, "--network", "host", *_ulimits(),
                *_mounts(), f"--volume={out}:/out", *flags, image, "/bin/sh", "-c", script)
        run = Run(out, port, name)
        wait_for(lambda: run.event("demux_attached") or run.event("demux_fallback")
                 or _podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
                 != "true", 60, "the boot line", interval=0.1)
        return run

    yield run
    for name in names:
        _podman("rm", "--force", "--time", "5", name, check=False)


def _stop(run: Run) -> None:
    """podman stop: SIGTERM to zion as PID 1; it exits 0 within the grace time."""
    _podman("stop", "--time", "20", run.name, timeout=60)
    code = _podman("inspect", "-f", "{{.State.ExitCode}}", run.name).stdout.strip()
    assert code == "0", (code, (run.out / "serve.log").read_text()[-3000:])
    assert run.event("shutting_down")["signal"] == "SIGTERM", run.lines()[-5:]
    assert run.event("stopped")["exit_code"] == 0


def _serves(run: Run) -> None:
    wait_for(lambda: run.get() == 200, 60, "HTTPS 200 from the container", interval=0.1)


def _fallback(run: Run, reason: str) -> dict:
    line = run.event("demux_fallback")
    assert line is not None and line["reason"] == reason, run.lines()
    assert line["level"] == "warning"
    return line


@pytest.mark.timeout(1800)  # a first run builds the root (debootstrap) and the image
def test_podman_default_profile_and_caps_fall_back_and_serve(run_container):
    run = run_container()
    # the image holds nothing that could compile the program
    assert (run.out / "compile-chain").read_text() == "", (run.out / "compile-chain").read_text()
    _fallback(run, "no_capability")
    _serves(run)
    report = run.doctor()
    assert report["bpf_demux"] == "cap_bpf_not_in_bounding_set", report
    assert "seccomp=filter" in report["capabilities"]
    assert "--cap-add BPF --security-opt seccomp=" in report["fix"]
    _stop(run)


@pytest.mark.timeout(120)
def test_cap_bpf_under_podmans_default_profile_is_bpf_syscall_refused(run_container):
    # Podman's profile allows bpf only with CAP_SYS_ADMIN
    run = run_container("--cap-add", "BPF")
    line = _fallback(run, "bpf_syscall_refused")
    assert "BPF_MAP_CREATE" in line["error"]
    _serves(run)
    report = run.doctor()
    assert report["bpf_demux"] == "bpf_syscall_refused" == report["reason"], report
    assert "cap_bpf=effective" in report["capabilities"]
    assert "seccomp=filter" in report["capabilities"]
    _stop(run)


@pytest.mark.timeout(120)
def test_cap_bpf_and_the_profile_with_bpf_allowed_attach_the_kept_object(run_container,
                                                                         tmp_path):
    profile = tmp_path / "zion-seccomp.json"
    with profile.open("w") as fh:  # the command docs/deployment.md gives
        subprocess.run([sys.executable, str(REPO / "scripts" / "seccomp_allow_bpf.py"),
                        str(DEFAULT_PROFILE)], stdout=fh, check=True, timeout=30)
    run = run_container("--cap-add", "BPF", "--security-opt", f"seccomp={profile}")
    attached = run.event("demux_attached")
    assert attached is not None, run.lines()
    # no CAP_PERFMON, no headers, no bcc: the object setup.sh compiled
    assert attached["object"].startswith(f"kept object {OBJECTS}/"), attached
    assert attached["prog_id"] in zion_prog_ids()  # the host's kernel sees it
    _serves(run)
    report = run.doctor()
    assert report["bpf_demux"] == "ready", report
    assert "seccomp=filter" in report["capabilities"]
    assert "cap_perfmon=no" in report["capabilities"]
    _stop(run)
    assert attached["prog_id"] not in zion_prog_ids()


@pytest.mark.timeout(120)
def test_privileged_attaches(run_container):
    run = run_container("--privileged")
    attached = run.event("demux_attached")
    assert attached is not None and attached["object"].startswith("kept object"), run.lines()
    _serves(run)
    assert run.doctor()["bpf_demux"] == "ready"
    _stop(run)


@pytest.mark.timeout(120)
def test_a_user_namespace_is_no_capability_whatever_the_container_is_given(run_container):
    # what rootless Podman does: the container's root is another uid here
    run = run_container("--cap-add", "BPF", "--uidmap", "0:100000:65536",
                        "--gidmap", "0:100000:65536")
    line = _fallback(run, "no_capability")
    assert "only in a user namespace (uid_map 0 100000 65536)" in line["error"], line
    _serves(run)
    report = run.doctor()
    assert report["bpf_demux"] == "cap_bpf_in_user_namespace", report
    _stop(run)
