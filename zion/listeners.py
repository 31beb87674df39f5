"""The listener group: N SO_REUSEPORT sockets on one address, one per worker.

The master creates them and keeps every one open for the life of the group,
so a worker that dies is replaced on the same socket and the connections the
kernel already queued on it are served by the replacement, not reset.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import struct
import subprocess
from dataclasses import dataclass, replace

from zion.errors import BindError


@dataclass(frozen=True)
class ListenerGroup:
    sockets: tuple[socket.socket, ...]
    host: str
    port: int
    family: socket.AddressFamily

    @property
    def display(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else (
            f"{self.host}:{self.port}"
        )

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def with_socket(self, index: int, sock: socket.socket) -> ListenerGroup:
        socks = list(self.sockets)
        socks[index] = sock
        return replace(self, sockets=tuple(socks))


def _family(host: str) -> socket.AddressFamily:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        if not infos:
            raise BindError(f"cannot resolve {host!r}") from None
        return infos[0][0]
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def bind_one(host: str, port: int, family: socket.AddressFamily, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Every socket of the group must set SO_REUSEPORT before bind(2), and
        # the kernel admits only sockets of the same effective uid to a group.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another process holds it without SO_REUSEPORT, or under another uid)"
        elif exc.errno == errno.EACCES:
            hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)"
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """--uds: one Unix socket every worker accepts from, for a proxy on the
    same host. No SO_REUSEPORT group and no demux: reuseport groups are for
    TCP and UDP sockets (the kernel's reuseport_* code hangs off inet
    sockets), and the program steers TCP connections. The workers share
    the one accept queue, as a classic pre-fork server does.

    A socket file left by a server that is gone (connect says ECONNREFUSED)
    is replaced; a live one, or a path that is not a socket, is an error.
    Mode 0666 as uvicorn's: the directory's permissions say who may connect."""
    import os
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise BindError(f"cannot bind {path}: {exc.strerror}") from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise BindError(f"cannot bind {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens on it
        except OSError as exc:
            raise BindError(f"cannot bind {path}: {exc.strerror}") from None
        else:
            raise BindError(f"cannot bind {path}: another server is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {path}: {exc.strerror}") from None
    return sock


def accept_queue_len(sock: socket.socket) -> int:
    """Connections the kernel queued on a listener that no one accepted yet.

    For a socket in LISTEN state, TCP_INFO's tcpi_unacked (offset 24) holds
    sk_ack_backlog, the accept queue length (net/ipv4/tcp.c, tcp_get_info)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


def ensure_unserved(host: str, port: int, family: socket.AddressFamily) -> None:
    """Refuse an address another process already listens on.

    Our listeners set SO_REUSEPORT, so binding next to another server of the
    same uid that set it too would silently join its group and split its
    traffic (its program, if any, would route ours). A probe bound without
    SO_REUSEPORT fails with EADDRINUSE exactly when someone listens there
    (SO_REUSEADDR only lets it past TIME_WAIT leftovers)."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"cannot bind {host}:{port}: it is already served by "
                            f"{_holder(port)} (one server per address)") from None
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


def _holder(port: int) -> str:
    """Who listens on `port`, as ss(8) tells it; best effort."""
    try:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "another process"
    found = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
    return f"{found.group(1)} (pid {found.group(2)})" if found else "another process"


def bind_group(host: str, port: int, count: int, backlog: int) -> ListenerGroup:
    """Bind `count` listeners; port 0 picks a free port once for all of them."""
    family = _family(host)
    if port:
        ensure_unserved(host, port, family)
    socks: list[socket.socket] = []
    probe = None
    try:
        if not port:
            # The kernel picks the port for a socket bound to port 0 without
            # SOCK_BINDPORT_LOCK, so shutdown(2) releases it and listen(2)
            # picks another (the master shuts and re-listens a listener to
            # move its queue): every socket of the group is bound to the port
            # by number. The probe holds the port while the others bind (no
            # client knows a port picked a moment ago).
            probe = bind_one(host, 0, family, backlog)
            port = probe.getsockname()[1]
        for _ in range(count):
            socks.append(bind_one(host, port, family, backlog))
    except BindError:
        for sock in socks:
            sock.close()
        raise
    finally:
        if probe is not None:
            probe.close()
    return ListenerGroup(tuple(socks), host, port, family)
