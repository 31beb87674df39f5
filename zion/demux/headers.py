"""Finding kernel headers for bcc on machines that ship none.

bcc compiles C at run time against kernel headers. This VM's kernel has no
/lib/modules and no kheaders, but an SK_REUSEPORT program uses only uapi
definitions, so any recent Debian linux-headers tree works. Debian splits it
into ...-common and ...-<arch>; bcc needs one tree, so we merge them with
symlinks (cp -rs) into a private cache and pass it as BCC_KERNEL_SOURCE.
Nothing is ever written under /lib/modules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from zion.demux.reasons import FallbackReason, Unavailable

_SRC = Path("/usr/src")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def find(configured: str, cache_dir: Path) -> tuple[str | None, str]:
    """Return (BCC_KERNEL_SOURCE value or None for bcc's default, how found)."""
    if configured:
        if not Path(configured, "include").is_dir():
            raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                             f"demux.kernel_headers={configured!r} has no include/ directory")
        return configured, "configured"
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not Path(env, "include").is_dir():
            raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                              f"BCC_KERNEL_SOURCE={env!r} has no include/")
        return env, "BCC_KERNEL_SOURCE"
    release = os.uname().release
    if Path(f"/lib/modules/{release}/build/include").is_dir():
        return None, f"/lib/modules/{release}/build"
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return None, "kheaders"
    return _merged_debian_tree(cache_dir)


def _merged_debian_tree(cache_dir: Path) -> tuple[str, str]:
    commons = sorted(_SRC.glob("linux-headers-*-common"), key=lambda p: _version_key(p.name))
    for common in reversed(commons):
        base = common.name[: -len("-common")]
        arch_dirs = [p for p in _SRC.glob(base + "-*") if p != common and p.is_dir()]
        if not arch_dirs:
            continue
        arch = arch_dirs[0]
        target = cache_dir / arch.name
        if (target / "include").is_dir() and (target / "arch").is_dir():
            return str(target), f"merged {common.name} + {arch.name}"
        _merge(common, arch, target)
        return str(target), f"merged {common.name} + {arch.name}"
    raise Unavailable(
        FallbackReason.NO_KERNEL_HEADERS,
        f"no headers for kernel {os.uname().release} and no linux-headers-*-common under /usr/src",
    )


def _merge(common: Path, arch: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    try:
        subprocess.run(["cp", "-rs", f"{common}/.", f"{tmp}/"], check=True,
                       capture_output=True)
        subprocess.run(["cp", "-rsf", f"{arch}/.", f"{tmp}/"], check=True, capture_output=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process merged it first
            shutil.rmtree(tmp, ignore_errors=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable(FallbackReason.NO_KERNEL_HEADERS,
                         f"merging {common} and {arch} failed: {exc.stderr.decode().strip()}"
                         ) from None
