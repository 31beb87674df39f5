"""A request's Task starts with its first step run at once: in its own Task
and context, and (the reason for it) a new TLS connection's session tickets
leave with the response instead of in a TCP segment of their own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import ssl
import struct

import uvloop

from zion.http import task_start

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="outer")


async def _app(seen: list[object]) -> str:
    task = asyncio.current_task()
    seen.append(("first", task, _VAR.get()))
    _VAR.set("inner")
    await asyncio.sleep(0)
    seen.append(("second", asyncio.current_task() is task, _VAR.get()))
    return "done"


def _in_a_callback(body):  # type: ignore[no-untyped-def]
    """Run body(loop) from a plain loop callback (as data_received is) on uvloop."""
    loop = uvloop.new_event_loop()
    try:
        async def main() -> object:
            done: asyncio.Future[object] = loop.create_future()
            loop.call_soon(lambda: done.set_result(body(loop)))
            return await (await done)  # type: ignore[misc]
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_first_step_runs_at_once_in_its_own_task_and_context() -> None:
    seen: list[object] = []

    def body(loop: asyncio.AbstractEventLoop) -> asyncio.Task[str]:
        task = task_start.start(loop, _app(seen))
        # Already run up to its first suspension, as the request's own Task.
        assert seen == [("first", task, "outer")]
        assert asyncio.current_task(loop) is None and not task.done()
        assert "call_soon" not in loop.__dict__
        return task

    assert _in_a_callback(body) == "done"
    assert seen[1] == ("second", True, "inner") and _VAR.get() == "outer"


def test_an_app_done_in_its_first_step_or_failing_leaves_a_finished_task() -> None:
    async def quick() -> int:
        return 7

    async def fails() -> None:
        raise ValueError("app bug")

    def body(loop: asyncio.AbstractEventLoop) -> asyncio.Future[object]:
        ok, bad = task_start.start(loop, quick()), task_start.start(loop, fails())
        assert ok.done() and ok.result() == 7
        assert bad.done() and isinstance(bad.exception(), ValueError)
        done: asyncio.Future[object] = loop.create_future()
        done.set_result(None)
        return done

    _in_a_callback(body)


def test_started_inside_another_task_it_runs_on_the_next_turn() -> None:
    async def main() -> None:
        seen: list[object] = []
        task = task_start.start(asyncio.get_running_loop(), _app(seen))
        assert seen == []  # 3.11 cannot step a Task inside another one's step
        assert await task == "done" and seen[0] == ("first", task, "outer")

    uvloop.run(main())


def _data_segments_in(sock: socket.socket) -> int:
    # struct tcp_info (include/uapi/linux/tcp.h): tcpi_data_segs_in at
    # offset 152 (Linux 4.6): segments with payload received.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("I", info, 152)[0])


def test_a_new_tls_connection_gets_tickets_and_response_in_one_segment(start_zion) -> None:
    """TLS 1.3: the server sends its session tickets once the client's
    Finished arrives. The client here sends Finished and its request in one
    segment, so both reach the worker in one read; the tickets and the
    response must then come back as one segment (one write), not two."""
    srv = start_zion("raw_app:app", workers=1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                assert chunk, "closed during the handshake"
                incoming.write(chunk)
        before = _data_segments_in(sock)
        tls.write(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        sock.sendall(outgoing.read())  # the client's Finished and the request
        answer = b""
        while b"got 0 bytes" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"closed before the response: {answer!r}"
            incoming.write(chunk)
            with contextlib.suppress(ssl.SSLWantReadError):
                while True:
                    answer += tls.read(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert tls.session is not None and tls.session.has_ticket  # the tickets came
        assert _data_segments_in(sock) - before == 1
