"""Finding kernel headers for bcc on machines that ship none.

bcc compiles C at run time against kernel headers. This VM's kernel has no
/lib/modules and no kheaders, but an SK_REUSEPORT program uses only uapi
definitions, so any recent Debian linux-headers tree works. Debian splits it
into ...-common and ...-<arch>; bcc needs one tree, so we merge them with
symlinks (cp -rs) into a private cache and pass it as BCC_KERNEL_SOURCE.
Nothing is ever written under /lib/modules.

Every probe treats an OSError as "not there" and goes on to the next
source: systemd's ProtectKernelModules=yes makes /usr/lib/modules an
inaccessible (mode 000) mount, where Python 3.11's Path.is_dir() raises
PermissionError instead of returning False. What was skipped, with its path
and errno, goes into the reason when no source is left.

The merged tree is made readable by everyone (directories 0755) whoever
merges it and whatever the umask: `zion doctor` run as root must not leave a
root-only cache that the service user then cannot read (EACCES). Kernel
headers are public.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from zion.demux.reasons import FallbackReason, Unavailable

_SRC = Path("/usr/src")
_MODULES = Path("/lib/modules")
_KHEADERS = Path("/sys/kernel/kheaders.tar.xz")


@dataclass
class Probes:
    """The paths a search could not look at, and why (errno)."""

    skipped: list[tuple[str, int]] = field(default_factory=list)

    def is_dir(self, path: Path) -> bool:
        try:
            return path.is_dir()
        except OSError as exc:
            self.skipped.append((str(path), exc.errno or 0))
            return False

    def exists(self, path: Path) -> bool:
        try:
            return path.exists()
        except OSError as exc:
            self.skipped.append((str(path), exc.errno or 0))
            return False

    def listdir(self, path: Path) -> list[str]:
        """Entry names; [] for a directory that is absent or unreadable
        (Path.glob would hide the EACCES)."""
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self.skipped.append((str(path), exc.errno or 0))
            return []

    def describe(self) -> str:
        return "; ".join(f"{p}: {errno_name(e)}" for p, e in self.skipped)

    @property
    def errno(self) -> int | None:
        return self.skipped[0][1] if self.skipped else None


def errno_name(err: int | None) -> str:
    if not err:
        return "?"
    return f"{errno_mod.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def find(configured: str, cache_dir: Path, *, modules: Path = _MODULES,
         src: Path = _SRC, kheaders: Path = _KHEADERS) -> tuple[str | None, str]:
    """Return (BCC_KERNEL_SOURCE value or None for bcc's default, how found)."""
    probes = Probes()
    if configured:
        if not probes.is_dir(Path(configured, "include")):
            raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                              f"demux.kernel_headers={configured!r} has no include/ directory"
                              + _skipped(probes), probes.errno)
        return configured, "configured"
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not probes.is_dir(Path(env, "include")):
            raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                              f"BCC_KERNEL_SOURCE={env!r} has no include/" + _skipped(probes),
                              probes.errno)
        return env, "BCC_KERNEL_SOURCE"
    release = os.uname().release
    build = modules / release / "build"
    if probes.is_dir(build / "include"):
        return None, str(build)
    if probes.exists(kheaders):
        return None, "kheaders"
    return _merged_debian_tree(cache_dir, src, probes)


def _skipped(probes: Probes) -> str:
    return f" (could not look at {probes.describe()})" if probes.skipped else ""


def _merged_debian_tree(cache_dir: Path, src: Path, probes: Probes) -> tuple[str, str]:
    names = probes.listdir(src)
    commons = sorted((src / n for n in names
                      if n.startswith("linux-headers-") and n.endswith("-common")),
                     key=lambda p: _version_key(p.name))
    for common in reversed(commons):
        base = common.name[: -len("-common")]
        arch_dirs = sorted(src / n for n in names
                           if n.startswith(base + "-") and src / n != common
                           and probes.is_dir(src / n))
        if not arch_dirs or not probes.is_dir(common):
            continue
        arch = arch_dirs[0]
        target = cache_dir / arch.name
        how = f"merged {common.name} + {arch.name}"
        if probes.is_dir(target / "include") and probes.is_dir(target / "arch"):
            return str(target), how
        _merge(common, arch, target)
        return str(target), how
    raise Unavailable(
        FallbackReason.NO_KERNEL_HEADERS,
        f"no headers for kernel {os.uname().release} and no linux-headers-*-common under "
        f"{src}" + _skipped(probes), probes.errno)


def _merge(common: Path, arch: Path, target: Path) -> None:
    try:
        make_shared_dir(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    except OSError as exc:
        raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                          f"cannot create the header cache {exc.filename or target.parent}: "
                          f"{errno_name(exc.errno)}", exc.errno) from None
    try:
        subprocess.run(["cp", "-rs", f"{common}/.", f"{tmp}/"], check=True,
                       capture_output=True)
        subprocess.run(["cp", "-rsf", f"{arch}/.", f"{tmp}/"], check=True, capture_output=True)
        try:
            share_tree(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                              f"cannot open the merged headers to the service user: "
                              f"{exc.filename}: {errno_name(exc.errno)}", exc.errno) from None
        try:
            os.rename(tmp, target)
        except OSError:  # another process merged it first
            shutil.rmtree(tmp, ignore_errors=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                          f"merging {common} and {arch} failed: {exc.stderr.decode().strip()}"
                          ) from None


def make_shared_dir(path: Path) -> None:
    """mkdir -p, each directory made here 0755 whatever the umask (the unit's
    UMask=0077, a root shell's 077): caches are for the service user too."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        os.chmod(directory, 0o755)


def share_tree(root: Path) -> None:
    """Directories 0755 and files 0644 under `root` (symlinks have no mode
    of their own); mkdtemp and cp under a 077 umask make them owner-only."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            # chmod follows a symlink: its target (under /usr/src) is not ours
            if not os.path.islink(full):
                os.chmod(full, 0o755 if name in dirnames else 0o644)
