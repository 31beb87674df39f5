"""The admin sockets, served from the master's select loop.

No thread: a thread in the master would run while the master forks workers
(a lock it holds at that moment stays locked forever in the child), and
every operation here is a non-blocking call on a socket select() said is
ready, so no admin client can make the master wait. Each connection has a
hard deadline from its accept and a bounded request; there is a cap on
connections open at once (past it the listener is not polled and the kernel
queues the rest), and a cap on accepts per wake-up.

It reports well-formed requests as events; the master answers them (with a
view of the host it reads at that moment) through `reply`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass
from enum import Enum

from zion.errors import BindError
from zion.settings import parse_host_port

MAX_REQUEST_HEAD = 8192  # bytes; the request line and headers, no body
CONNECTION_TIMEOUT = 5.0  # seconds from accept to the last byte of the answer
MAX_CONNECTIONS = 64  # per listener: scrapers cannot crowd out the agent-check
_ACCEPTS_PER_WAKE = 16
_BACKLOG = 64


class Kind(Enum):
    HTTP = "http"
    AGENT = "agent"


@dataclass(frozen=True)
class Request:
    """A client the master should answer: an HTTP request, or an agent-check
    connection (HAProxy sends nothing unless `agent-send` is set)."""

    fd: int
    kind: Kind
    method: str = ""
    path: str = ""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class _Conn:
    __slots__ = ("sock", "kind", "deadline", "head", "out", "method")

    def __init__(self, sock: socket.socket, kind: Kind, deadline: float) -> None:
        self.sock = sock
        self.kind = kind
        self.deadline = deadline
        self.head = bytearray()
        self.out: memoryview | None = None  # set once answered
        self.method = ""


def bind(address: str, what: str) -> socket.socket:
    """A non-blocking listening socket on HOST:PORT; BindError names `what`."""
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind the {what} listener {address}: {exc.strerror}") from None
    return sock


class AdminListeners:
    def __init__(self, http: socket.socket | None, agent: socket.socket | None) -> None:
        self.listeners = {s.fileno(): (s, k) for s, k in ((http, Kind.HTTP), (agent, Kind.AGENT))
                          if s is not None}
        self.conns: dict[int, _Conn] = {}

    def __bool__(self) -> bool:
        return bool(self.listeners)

    def address(self, kind: Kind) -> tuple[str, int] | None:
        for sock, k in self.listeners.values():
            if k is kind:
                name = sock.getsockname()
                return str(name[0]), int(name[1])
        return None

    # -- for the master's select() ---------------------------------------------

    def fds(self) -> list[int]:
        """Every descriptor held: a forked worker must close them all."""
        return [*self.listeners, *self.conns]

    def read_fds(self) -> list[int]:
        listening = [fd for fd, (_, kind) in self.listeners.items() if not self._full(kind)]
        return listening + [fd for fd, c in self.conns.items() if c.out is None]

    def _full(self, kind: Kind) -> bool:
        return sum(1 for c in self.conns.values() if c.kind is kind) >= MAX_CONNECTIONS

    def write_fds(self) -> list[int]:
        return [fd for fd, c in self.conns.items() if c.out is not None]

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.conns.values()), default=None)

    def on_ready(self, readable: list[int], writable: list[int], now: float) -> list[Request]:
        requests: list[Request] = []
        for fd in readable:
            if fd in self.listeners:
                requests += self._accept(fd, now)
            elif fd in self.conns:
                req = self._read(self.conns[fd])
                if req is not None:
                    requests.append(req)
        for fd in writable:
            if fd in self.conns:
                self._write(self.conns[fd])
        self._expire(now)
        return requests

    # -- answering -------------------------------------------------------------

    def reply(self, req: Request, reply: Reply) -> None:
        conn = self.conns.get(req.fd)
        if conn is None:
            return
        self._answer(conn, reply)

    def reply_line(self, req: Request, line: str) -> None:
        conn = self.conns.get(req.fd)
        if conn is not None:
            conn.out = memoryview(line.encode("ascii"))
            self._write(conn)

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        for sock, _ in self.listeners.values():
            sock.close()
        self.listeners.clear()

    # -- internals -------------------------------------------------------------

    def _accept(self, fd: int, now: float) -> list[Request]:
        sock, kind = self.listeners[fd]
        out = []
        for _ in range(_ACCEPTS_PER_WAKE):
            if self._full(kind):
                break
            try:
                client, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                break  # EMFILE and the like: try again on the next wake-up
            client.setblocking(False)
            conn = _Conn(client, kind, now + CONNECTION_TIMEOUT)
            self.conns[client.fileno()] = conn
            if kind is Kind.AGENT:
                out.append(Request(client.fileno(), kind))
        return out

    def _read(self, conn: _Conn) -> Request | None:
        try:
            data = conn.sock.recv(MAX_REQUEST_HEAD + 1 - len(conn.head))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._drop(conn.sock.fileno())
            return None
        if not data:
            self._drop(conn.sock.fileno())
            return None
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            end = conn.head.find(b"\n\n")
        if end < 0:
            if len(conn.head) > MAX_REQUEST_HEAD:
                self._answer(conn, Reply(431, b"request head too large\n"))
            return None
        return self._parse(conn, bytes(conn.head[:end]))

    def _parse(self, conn: _Conn, head: bytes) -> Request | None:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1].startswith(b"/"):
            self._answer(conn, Reply(400, b"bad request line\n"))
            return None
        method, target, version = parts
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            self._answer(conn, Reply(505, b"HTTP/1.0 or HTTP/1.1 only\n"))
            return None
        try:
            conn.method = method.decode("ascii")
            path = target.split(b"?", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            self._answer(conn, Reply(400, b"bad request line\n"))
            return None
        return Request(conn.sock.fileno(), Kind.HTTP, conn.method, path)

    def _answer(self, conn: _Conn, reply: Reply) -> None:
        body = b"" if conn.method == "HEAD" else reply.body
        head = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
                f"content-type: {reply.content_type}\r\n"
                f"content-length: {len(reply.body)}\r\n"
                "cache-control: no-store\r\n"
                f"{'allow: GET, HEAD' + chr(13) + chr(10) if reply.status == 405 else ''}"
                "connection: close\r\n\r\n").encode("ascii")
        conn.out = memoryview(head + body)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn.sock.fileno())
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        # Whatever the client sent and we did not read (an agent-send string,
        # a request body) is read and dropped first: closing a socket with
        # unread data sends RST (RFC 2525, 2.17), and an RST can reach the
        # client before it has read our answer.
        with contextlib.suppress(OSError):
            while conn.sock.recv(4096):
                pass
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._drop(conn.sock.fileno())

    def _expire(self, now: float) -> None:
        for fd, conn in list(self.conns.items()):
            if now >= conn.deadline:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()
