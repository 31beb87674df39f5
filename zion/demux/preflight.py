"""Cheap checks before loading: kernel version, capabilities; bcc's import.

Capabilities come from capget(2), not the uid: under systemd with
AmbientCapabilities=CAP_BPF a non-root master may load the program, and a
root one in a container without CAP_BPF may not.
"""

from __future__ import annotations

import errno as errno_mod
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from zion import caps
from zion.demux.reasons import FallbackReason, Unavailable
from zion.settings import Settings

# Debian's python3-bpfcc; loaded by path so the rest of dist-packages stays out.
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc/__init__.py")
# BPF_PROG_TYPE_SK_REUSEPORT with bpf_sk_select_reuseport and mmapable arrays.
KERNEL_MINIMUM = (5, 5)


def check(settings: Settings) -> None:
    """Raise Unavailable with the first thing that rules the demux out. Kernel
    headers and bcc are needed only when no compiled object is kept
    (zion/demux/objects.py): policy.obtain looks for them then."""
    if kernel_version() < KERNEL_MINIMUM:
        raise Unavailable(FallbackReason.KERNEL_UNSUPPORTED,
                          f"kernel {os.uname().release} < {'.'.join(map(str, KERNEL_MINIMUM))}")
    have = caps.effective()
    if caps.CAP_BPF not in have and caps.CAP_SYS_ADMIN not in have:
        raise Unavailable(FallbackReason.NO_CAPABILITY,
                          "neither cap_bpf nor cap_sys_admin is effective", errno_mod.EPERM)
    namespace = caps.user_namespace()
    if namespace is not None:
        raise Unavailable(FallbackReason.NO_CAPABILITY,
                          f"cap_bpf is effective only in a user namespace (uid_map {namespace}): "
                          "bpf() asks for it in the initial one", errno_mod.EPERM)


def cache_dir(settings: Settings) -> Path:
    from zion.tls import state_dir

    return state_dir(settings.tls) / "kernel-headers"


def kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def import_bcc() -> ModuleType:
    """Import iovisor bcc: from the path, else Debian's copy by file location."""
    try:
        import bcc
    except ModuleNotFoundError as exc:
        if exc.name != "bcc":
            raise Unavailable(FallbackReason.NO_BCC,
                              f"bcc needs a module that is missing: {exc}") from None
        bcc = _import_debian_bcc()
    except (ImportError, OSError) as exc:
        raise Unavailable(FallbackReason.NO_BCC, f"bcc does not import: {exc}") from None
    if not hasattr(bcc, "BPF"):
        raise Unavailable(FallbackReason.NO_BCC, "the 'bcc' module found is not iovisor bcc "
                          "(PyPI's bcc is an unrelated package)")
    module: ModuleType = bcc
    return module


def _import_debian_bcc() -> ModuleType:
    if not DEBIAN_BCC.exists():
        raise Unavailable(FallbackReason.NO_BCC,
                          "bcc is not installed (Debian package python3-bpfcc)")
    spec = importlib.util.spec_from_file_location(
        "bcc", DEBIAN_BCC, submodule_search_locations=[str(DEBIAN_BCC.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        del sys.modules["bcc"]
        raise Unavailable(FallbackReason.NO_BCC, f"Debian's bcc does not import: {exc}") from None
    return module
