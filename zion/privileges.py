"""Least privilege: what a worker may still do after fork, and what it may
do to the master.

A worker serves connections on a socket it already holds, with a TLS
context already built: it needs no capability at all. So right after fork it
leaves every capability set (bounding and ambient included, so nothing can
come back through exec), optionally switches to --user/--group, sets
no_new_privs, and asks for SIGTERM if the master dies (set after the uid
change, which clears it; the parent is checked once more for the race).

The master makes itself non-dumpable: then reading /proc/<master>/mem or
ptrace(2)-ing it needs CAP_SYS_PTRACE, which no worker has, whatever its uid.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import signal
from dataclasses import dataclass
from pathlib import Path

from zion import caps

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def resolve(user: str, group: str) -> Identity | None:
    """--user/--group to ids; None when neither is given. Raises KeyError
    naming what does not exist (the settings turn it into a config error)."""
    if not user and not group:
        return None
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    return Identity(entry.pw_uid, gid, entry.pw_name)


def protect_master() -> None:
    _prctl(_PR_SET_DUMPABLE, 0)


# What the master still needs once its first generation is up: load the demux
# again on a resizing reload (CAP_BPF; CAP_PERFMON and CAP_SYS_ADMIN stand in
# for it on older kernels), bind new listeners below 1024, fork workers that
# switch to --user and empty their bounding set, and signal them once they
# are another uid.
MASTER_KEEPS = {caps.CAP_BPF, caps.CAP_PERFMON, caps.CAP_SYS_ADMIN,
                caps.CAP_NET_BIND_SERVICE, caps.CAP_SETUID, caps.CAP_SETGID,
                caps.CAP_SETPCAP, caps.CAP_KILL}


def restrict_master() -> set[int]:
    """Give up every capability the master does not need (they are all it
    would hold for the rest of its life). Returns what it keeps."""
    # With CAP_BPF (5.8+) loading needs no CAP_SYS_ADMIN.
    keep = (MASTER_KEEPS - {caps.CAP_SYS_ADMIN} if caps.CAP_BPF in caps.effective()
            else MASTER_KEEPS)
    return caps.keep_only(keep)


def drop_worker_privileges(identity: Identity | None, master_pid: int) -> None:
    last = _last_cap()
    for cap in range(last + 1):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: fine
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if identity is not None:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    caps.clear()
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != master_pid:  # the master died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
