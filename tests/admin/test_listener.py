"""The admin sockets on their own: real sockets, the master's select() done
here, time passed in, so bounds and deadlines are checked without waiting."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from zion.admin import listener
from zion.admin.listener import AdminListeners, Kind, Reply, Request
from zion.errors import BindError


@pytest.fixture
def admin() -> Iterator[AdminListeners]:
    listeners = AdminListeners(listener.bind("127.0.0.1:0", "admin"),
                               listener.bind("127.0.0.1:0", "agent"))
    yield listeners
    listeners.close()


def pump(admin: AdminListeners, now: float | None = None, rounds: int = 20,
         answer: Reply | None = None) -> list[Request]:
    """What the master's loop does, a few rounds: select, hand over, answer."""
    seen = []
    for _ in range(rounds):
        r, w, _ = select.select(admin.read_fds(), admin.write_fds(), [], 0.05)
        for req in admin.on_ready(r, w, time.monotonic() if now is None else now):
            seen.append(req)
            if req.kind is Kind.AGENT:
                admin.reply_line(req, "up ready 100%\n")
            else:
                admin.reply(req, answer or Reply(200, f"{req.method} {req.path}\n".encode()))
    return seen


def connect(admin: AdminListeners, kind: Kind) -> socket.socket:
    address = admin.address(kind)
    assert address is not None
    sock = socket.create_connection(address, timeout=5)
    return sock


def read_all(sock: socket.socket, admin: AdminListeners) -> bytes:
    sock.setblocking(False)
    out = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pump(admin, rounds=1)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"not closed; got {out!r}")


def test_a_request_becomes_an_event_and_gets_one_answer(admin: AdminListeners) -> None:
    with connect(admin, Kind.HTTP) as sock:
        sock.sendall(b"GET /metrics?x=1 HTTP/1.1\r\nhost: a\r\n\r\n")
        answer = read_all(sock, admin)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in answer
        assert answer.endswith(b"\r\n\r\nGET /metrics\n")
        assert not admin.conns


def test_head_gets_no_body(admin: AdminListeners) -> None:
    with connect(admin, Kind.HTTP) as sock:
        sock.sendall(b"HEAD /ready HTTP/1.0\r\n\r\n")
        answer = read_all(sock, admin)
        assert b"content-length: 12\r\n" in answer and answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /" + b"a" * 9000, b"431"),
])
def test_bad_requests_are_answered_by_the_listener(admin: AdminListeners, request_bytes: bytes,
                                                   status: bytes) -> None:
    with connect(admin, Kind.HTTP) as sock:
        sock.sendall(request_bytes)
        answer = read_all(sock, admin)
        assert answer.startswith(b"HTTP/1.1 " + status)


def test_agent_gets_its_line_then_a_clean_close(admin: AdminListeners) -> None:
    with connect(admin, Kind.AGENT) as sock:
        # agent-send: bytes we never read must not turn the close into a reset.
        sock.sendall(b"zion/a\n")
        assert read_all(sock, admin) == b"up ready 100%\n"


def test_a_silent_client_is_dropped_at_its_deadline(admin: AdminListeners) -> None:
    with connect(admin, Kind.HTTP) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes
        start = time.monotonic()
        pump(admin, now=start, rounds=3)
        assert len(admin.conns) == 1
        deadline = admin.next_deadline()
        assert deadline is not None and deadline <= start + listener.CONNECTION_TIMEOUT + 1
        pump(admin, now=start + listener.CONNECTION_TIMEOUT + 1, rounds=1)
        assert not admin.conns
        sock.settimeout(5)
        assert sock.recv(100) == b""


def test_connections_are_capped_per_listener(admin: AdminListeners) -> None:
    with contextlib.ExitStack() as idle:
        for _ in range(listener.MAX_CONNECTIONS + 5):
            idle.enter_context(connect(admin, Kind.HTTP))
            pump(admin, rounds=1)
        http = [c for c in admin.conns.values() if c.kind is Kind.HTTP]
        assert len(http) == listener.MAX_CONNECTIONS
        http_fd = next(fd for fd, (_, k) in admin.listeners.items() if k is Kind.HTTP)
        assert http_fd not in admin.read_fds()
        # Scrapers that hog the HTTP side leave the agent-check alone.
        with connect(admin, Kind.AGENT) as agent:
            assert read_all(agent, admin) == b"up ready 100%\n"


def test_bind_errors_are_typed() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"cannot bind the admin listener 127.0.0.1:{port}"):
            listener.bind(f"127.0.0.1:{port}", "admin")


def test_bytes_never_read_do_not_cut_a_long_answer(admin: AdminListeners) -> None:
    """Closing a socket with unread input sends RST (RFC 2525, 2.17), and
    the kernel drops what it had not sent yet: a slow scraper would get half
    of /metrics. A small receive window keeps most of the answer queued on
    our side when we close."""
    address = admin.address(Kind.HTTP)
    assert address is not None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        body = b"m" * 16_000_000  # more than the kernel buffers (tcp_wmem max 4 MiB)
        got: list[bytes] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while chunk := sock.recv(65536):
                    got.append(chunk)
            except OSError as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while not admin.write_fds() and time.monotonic() < deadline:
            pump(admin, rounds=1, answer=Reply(200, body))  # answering, most of it still queued
        sock.sendall(b"x" * 1000)  # bytes after the request that nobody reads
        while admin.conns and time.monotonic() < deadline:
            pump(admin, rounds=1, answer=Reply(200, body))
        reader.join(10)
        assert not errors, errors
        assert b"".join(got).endswith(body)
