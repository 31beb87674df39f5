"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send `READY=1`-style lines; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    payload = "\n".join(lines).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(payload)
        except OSError:
            return False
    return True


def monotonic_usec() -> str:
    # systemd wants MONOTONIC_USEC with RELOADING=1 to order the reload.
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
