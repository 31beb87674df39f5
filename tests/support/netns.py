"""A network namespace joined to the host by a veth pair: a client on
another host, as far as the server can tell. Names start with the owner's
prefix so parallel runs of other tests never collide; `remove` is safe to
call twice and on a half-made namespace."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why a namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


class NetNS:
    def __init__(self, prefix: str, tag: int) -> None:
        tag %= 10_000
        self.name = f"{prefix}{tag}"
        # Interface names are at most 15 bytes (IFNAMSIZ - 1).
        self.host_if = f"{prefix}h{tag}"[:15]
        self.ns_if = f"{prefix}n{tag}"[:15]
        self.host_ip = f"10.231.{tag % 250}.1"
        self.ns_ip = f"10.231.{tag % 250}.2"

    def _ip(self, *args: str, inside: bool = False) -> None:
        cmd = ["ip", *(["netns", "exec", self.name, "ip"] if inside else []), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def create(self) -> NetNS:
        self.remove()  # a previous run that was killed
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, inside=True)
        self._ip("link", "set", self.ns_if, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)
        return self

    def remove(self) -> None:
        for args in (["netns", "del", self.name], ["link", "del", self.host_if]):
            subprocess.run(["ip", *args], capture_output=True, timeout=10)

    def enter(self) -> None:
        """Move the calling thread into the namespace (setns(2) acts on the
        thread): sockets it creates from now on live there. Call it from a
        thread made for the purpose, never the test's own."""
        fd = os.open(Path("/run/netns") / self.name, os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)
