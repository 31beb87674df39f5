"""HTTP/1.1 semantics and hostile input, against a real server over real TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from tests.conftest import (
    client_context,
    close,
    connect,
    get,
    inflight,
    read_response,
    read_until_closed,
    wait_for,
)
from tests.support.asgi import read_body
from tests.support.fake_transport import connect as fake_connect
from tests.support.fake_transport import make_state, settle, until


@pytest.fixture
def server(start_zion):
    return start_zion("raw_app:app", env={"ZION_LIMITS_HEADER_TIMEOUT": "1",
                                          "ZION_LIMITS_MAX_BODY_SIZE": "100000"})


async def still_serving(port: int) -> None:
    resp = await get(port, "/")
    assert resp.status == 200, "the server must keep answering the next client"


async def test_keep_alive_and_standard_headers(server):
    reader, writer = await connect(server.port)
    pids = set()
    for _ in range(3):
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 200 and resp.body == b"got 0 bytes"
        assert resp.headers["server"] == "zion"
        assert parsedate_to_datetime(resp.headers["date"]).tzinfo is not None
        assert "connection" not in resp.headers  # keep-alive is the 1.1 default
        pids.add(resp.headers["x-pid"])
    assert len(pids) == 1  # same connection, same worker
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    resp = await read_response(reader)
    assert resp.headers["connection"] == "close"
    assert await read_until_closed(reader) == b""
    await close(writer)


async def test_http10_closes_by_default(server):
    reader, writer = await connect(server.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers["connection"] == "close"
    await close(writer)


async def test_pipelined_requests_answered_in_order(server):
    reader, writer = await connect(server.port)
    writer.write(b"".join(
        b"POST /p%d HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (i, i, b"a" * i)
        for i in range(1, 6)))
    for i in range(1, 6):
        resp = await read_response(reader)
        assert resp.body == b"got %d bytes" % i
    await close(writer)


async def test_chunked_request_body(server):
    reader, writer = await connect(server.port)
    writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    resp = await read_response(reader)
    assert resp.body == b"got 11 bytes"
    await close(writer)


async def test_streamed_response_is_chunked(start_zion):
    srv = start_zion("starlette_app:app")
    resp = await get(srv.port, "/stream")
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.body == b"".join(b"chunk %d\n" % i for i in range(5))


async def test_large_response_with_backpressure(server):
    reader, writer = await connect(server.port)
    writer.write(b"GET /big?4000000 HTTP/1.1\r\nhost: x\r\n\r\n")
    resp = await read_response(reader)
    assert len(resp.body) == 4_000_000
    await close(writer)


async def test_expect_100_continue(server):
    reader, writer = await connect(server.port)
    writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(read_response(reader), 5)
    assert interim.status == 100
    writer.write(b"data")
    resp = await read_response(reader)
    assert resp.status == 200 and resp.body == b"got 4 bytes"
    await close(writer)


async def test_head_has_headers_but_no_body(server):
    reader, writer = await connect(server.port)
    writer.write(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await read_response(reader, head_request=True)
    assert head.status == 200 and head.headers["content-length"] == "11"
    after = await read_response(reader)  # the next response starts right after the head
    assert after.body == b"got 0 bytes"
    await close(writer)


async def test_app_without_response_gets_500(server):
    resp = await get(server.port, "/no-response")
    assert resp.status == 500


# -- bad input: a 4xx, a closed connection, and the worker lives on --------------


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nx-big: " + b"v" * 20000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\ncontent-length: 999999999\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\ncontent-length: 12abc\r\n\r\n", 400),
])
async def test_bad_requests_get_4xx_and_close(server, raw, status):
    reader, writer = await connect(server.port)
    writer.write(raw)
    data = await read_until_closed(reader)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"connection: close" in data
    await close(writer)
    await still_serving(server.port)


async def flood(writer, head: bytes, piece: bytes, times: int) -> None:
    """Keep sending until done or until the server cuts the connection."""
    writer.write(head)
    try:
        for _ in range(times):
            writer.write(piece)
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass


async def test_header_bomb_without_end_is_cut_off(server):
    # A header line that never ends: httptools would buffer it forever.
    reader, writer = await connect(server.port)
    await flood(writer, b"GET / HTTP/1.1\r\nx-bomb: ", b"v" * 4096, 40)
    data = await read_until_closed(reader)
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    await close(writer)
    await still_serving(server.port)


async def test_chunked_body_over_limit_gets_413(server):
    reader, writer = await connect(server.port)
    await flood(writer, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
                b"1000\r\n" + b"z" * 4096 + b"\r\n", 30)
    data = await read_until_closed(reader)
    assert b"413" in data.split(b"\r\n", 1)[0]
    await close(writer)
    await still_serving(server.port)


async def test_slowloris_gets_408(server):
    reader, writer = await connect(server.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")  # never finishes the header section
    await writer.drain()
    data = await read_until_closed(reader, timeout=10)  # header_timeout is 1 s here
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    await close(writer)
    await still_serving(server.port)


async def test_idle_keepalive_closed(start_zion):
    srv = start_zion("raw_app:app", env={"ZION_LIMITS_KEEPALIVE_TIMEOUT": "0.5"})
    reader, writer = await connect(srv.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await read_response(reader)
    assert await read_until_closed(reader, timeout=10) == b""
    await close(writer)


async def test_bytes_that_are_not_tls(server):
    for payload in (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"\x00" * 512, b"\x16\x03\x01\xff\xff"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    await still_serving(server.port)


async def test_client_gone_mid_body(start_zion, tmp_path):
    events = tmp_path / "events"
    srv = start_zion("raw_app:app", env={"ZION_TEST_EVENTS": str(events)})

    def send_half_and_reset() -> None:
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        tls = client_context().wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"POST /disconnect HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
        tls.sendall(b"x" * 1000)
        wait_for(lambda: events.exists() or inflight(srv.port) > 0, 5, "the request to arrive")
        # SO_LINGER 0: close with a reset, as a client that crashed would.
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()

    await asyncio.to_thread(send_half_and_reset)
    seen = wait_for(lambda: events.exists() and events.read_text(), 10, "the app's receive log")
    assert seen.split()[-1] == "http.disconnect"
    await still_serving(srv.port)
    assert not srv.events("worker_died")


async def test_app_content_length_written_once(server):
    reader, writer = await connect(server.port)
    writer.write(b"GET /big?10 HTTP/1.1\r\nhost: x\r\n\r\n")
    resp = await read_response(reader)
    assert resp.raw_head.lower().count(b"content-length:") == 1
    assert resp.body == b"x" * 10
    await close(writer)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_memory_stays_bounded_for_a_pipelining_client_that_never_reads(start_zion):
    srv = start_zion("raw_app:app", workers=1)
    worker = srv.worker_pids()[0]
    before = _rss_mib(worker)
    _reader, writer = await connect(srv.port)
    burst = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" * 4096  # ~110 KB of requests
    sent, stuck = 0, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    try:
        # Until the server has stopped reading for 4 s, or 60 MB, or 20 s.
        while sent < 60 * 1024 * 1024 and stuck < 2 and loop.time() < deadline:
            writer.write(burst)
            try:
                await asyncio.wait_for(writer.drain(), 2)
                stuck = 0
            except TimeoutError:
                stuck += 1
            sent += len(burst)
        grown = _rss_mib(worker) - before
    finally:
        writer.transport.abort()
    # Without the bound, 60 MB of requests become ~150 MB of buffered answers.
    assert grown < 40, f"worker grew {grown:.0f} MiB after {sent / 2**20:.0f} MiB of requests"
    await still_serving(srv.port)


async def test_slow_body_gets_408_at_body_timeout(start_zion):
    srv = start_zion("raw_app:app", env={"ZION_LIMITS_BODY_TIMEOUT": "1"}, workers=1)
    reader, writer = await connect(srv.port)
    writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
    await writer.drain()
    out = await read_until_closed(reader, timeout=10)
    assert out.startswith(b"HTTP/1.1 408") and b"body not received in time" in out
    await close(writer)
    await still_serving(srv.port)


async def test_a_reader_that_stops_reading_is_cut_at_send_timeout(start_zion, tmp_path):
    (tmp_path / "big.bin").write_bytes(b"z" * (32 * 1024 * 1024))
    srv = start_zion("--root", str(tmp_path), env={"ZION_LIMITS_SEND_TIMEOUT": "1"}, workers=1)
    reader, writer = await connect(srv.port)
    writer.write(b"GET /big.bin HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()

    async def connections() -> int:
        return int((await get(srv.port, "/_zion/status")).json()["connections"])

    # It never reads: once the server gives up, only the status request is open.
    for _ in range(200):
        if await connections() == 1:
            break
        await asyncio.sleep(0.05)
    assert await connections() == 1
    got = await read_until_closed(reader, timeout=10)
    assert len(got) < 32 * 1024 * 1024  # cut before the whole file went out
    await close(writer)


async def test_connections_the_server_closed_stop_counting_at_once(start_zion):
    srv = start_zion("raw_app:app", env={"ZION_LIMITS_MAX_CONNECTIONS": "3",
                                         "ZION_LIMITS_KEEPALIVE_TIMEOUT": "1"}, workers=1)

    def idle_client() -> ssl.SSLSocket:
        # A blocking TLS socket: it reads the server's close_notify but never
        # answers it, so the server's TLS shutdown lingers.
        sock = client_context().wrap_socket(
            socket.create_connection(("127.0.0.1", srv.port), timeout=10),
            server_hostname="localhost")
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"got 0 bytes" not in data:
            data += sock.recv(65536)
        while sock.recv(65536):  # until the server closes it at keepalive_timeout
            pass
        return sock

    idle = await asyncio.gather(*(asyncio.to_thread(idle_client) for _ in range(3)))
    try:
        # Closed by the server but not yet shut down: they must not count.
        assert (await get(srv.port, "/")).status == 200
    finally:
        for sock in idle:
            sock.close()


async def test_bytes_after_connection_close_get_the_answer_then_a_close(server):
    reader, writer = await connect(server.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                 b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    out = await read_until_closed(reader)
    await close(writer)
    assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1") == 1
    assert b"400" not in out.split(b"\r\n", 1)[0]


async def test_closed_connections_are_freed_without_the_cyclic_gc(start_zion):
    # The httptools parser holds the protocol as its callbacks; unbroken, that
    # cycle kept every closed connection (TLS transport and buffers included)
    # until a full cyclic collection. With the worker's collector off, closed
    # connections, and the HTTP/1.1 half of each WebSocket, must still go.
    import websockets

    srv = start_zion("ws_deaf_app:app", "--no-bpf-demux", workers=1)
    assert (await get(srv.port, "/gc?off")).body == b"gc_enabled=False"
    try:
        for _ in range(40):
            assert (await get(srv.port, "/alive?H1Protocol")).status == 200
        for _ in range(3):
            async with websockets.connect(f"wss://127.0.0.1:{srv.port}/ws",
                                          ssl=client_context(alpn=False),
                                          server_hostname="localhost"):
                pass

        async def alive() -> int:
            body = (await get(srv.port, "/alive?H1Protocol")).body.decode()
            return int(body.split("=")[1])

        deadline = asyncio.get_running_loop().time() + 10
        while (left := await alive()) > 1:  # the connection asking is alive
            assert asyncio.get_running_loop().time() < deadline, (
                f"{left} HTTP/1.1 connections still in memory after they closed")
    finally:
        await get(srv.port, "/gc?on")


@pytest.mark.parametrize(("target", "path", "raw_path", "query"), [
    (b"/a/b", "/a/b", b"/a/b", b""),
    (b"/a?x=1&y=2", "/a", b"/a", b"x=1&y=2"),
    (b"/a?x=1?y", "/a", b"/a", b"x=1?y"),  # a second "?" belongs to the query
    (b"/a?", "/a", b"/a", b""),
    (b"/a%20b?q=%41", "/a b", b"/a%20b", b"q=%41"),  # the query stays raw
    (b"/a?x=1#frag", "/a", b"/a", b"x=1"),  # a fragment is never the server's
    (b"http://example.com/p?q=1", "/p", b"/p", b"q=1"),  # absolute-form
])
async def test_the_request_target_is_split_into_path_and_query(target, path, raw_path, query):
    from tests.support.fake_transport import connect as connect_fake
    from tests.support.fake_transport import make_state, settle

    seen = {}

    async def app(scope, receive, send):
        seen.update(path=scope["path"], raw_path=scope["raw_path"], query=scope["query_string"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    tr = connect_fake(make_state(), app)
    tr.feed(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    await settle()
    assert tr.take().startswith(b"HTTP/1.1 204")
    assert seen == {"path": path, "raw_path": raw_path, "query": query}


# -- drain, over a fake transport ------------------------------------------------

GET_X = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


async def _answer_after(gate: asyncio.Event | None, scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if gate is not None:  # a streamed response: its head goes out now
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"k"})
        return
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_request_sent_on_an_idle_connection_as_the_drain_begins_is_answered():
    # The keep-alive race: the client reuses the connection the instant the
    # worker starts draining. Closing it then loses a request the client
    # cannot know was not run; it is answered, saying `connection: close`.
    state = make_state()
    tr = fake_connect(state, lambda s, r, se: _answer_after(None, s, r, se))
    tr.feed(GET_X)
    await until(lambda: tr.buffer.endswith(b"ok"))
    assert b"connection: close" not in tr.take()
    state.draining = True
    tr.protocol.shutdown()
    assert not tr.closed
    tr.feed(GET_X)
    await until(lambda: tr.closed)
    answer = tr.take()
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in answer


async def test_a_response_begun_before_the_drain_keeps_its_connection_for_the_next_request():
    # Its head promised keep-alive; the client will send again on it.
    state = make_state()
    gate = asyncio.Event()
    tr = fake_connect(state, lambda s, r, se: _answer_after(gate, s, r, se))
    tr.feed(GET_X)
    await until(lambda: b"\r\n\r\n" in tr.buffer)
    state.draining = True
    tr.protocol.shutdown()
    gate.set()
    await until(lambda: tr.buffer.endswith(b"0\r\n\r\n"))
    await settle()
    assert not tr.closed
    tr.feed(GET_X)  # gate is set: answered at once, with `connection: close`
    await until(lambda: tr.closed)
    answers = tr.take()
    assert answers.count(b"HTTP/1.1 200") == 2 and answers.count(b"connection: close") == 1


async def test_an_idle_connection_closes_a_short_grace_after_the_drain_begins():
    state = make_state(limits={"keepalive_timeout": 60.0})
    tr = fake_connect(state, lambda s, r, se: _answer_after(None, s, r, se))
    tr.feed(GET_X)
    await until(lambda: tr.buffer.endswith(b"ok"))
    now = asyncio.get_running_loop().time()
    tr.protocol.check_deadline(now + 2)
    assert not tr.closed  # not draining: the keep-alive timeout (60 s) holds
    state.draining = True
    tr.protocol.shutdown()
    tr.protocol.check_deadline(now + 0.5)
    assert not tr.closed
    tr.protocol.check_deadline(now + 2)
    assert tr.closed


# -- when the header deadline starts, over a fake transport -------------------------

async def test_a_second_request_that_stops_mid_header_gets_408_at_the_header_timeout():
    # The request starts at its target's first bytes (h1.py has no
    # on_message_begin): from there the header timeout holds, not the idle
    # keep-alive timeout the connection had before.
    state = make_state(limits={"keepalive_timeout": 60.0, "header_timeout": 5.0})
    tr = fake_connect(state, lambda s, r, se: _answer_after(None, s, r, se))
    tr.feed(GET_X)
    await until(lambda: tr.buffer.endswith(b"ok"))
    tr.take()
    tr.feed(b"GET /next HTTP/1.1\r\nhost: x\r\n")  # never finishes the header section
    now = asyncio.get_running_loop().time()
    tr.protocol.check_deadline(now + 4)
    assert not tr.closed
    tr.protocol.check_deadline(now + 6)
    assert tr.closed and tr.take().startswith(b"HTTP/1.1 408 ")


async def test_a_head_begun_before_the_previous_answer_ended_keeps_its_header_timeout():
    # The next request's first bytes arrive with the first request, in the
    # same read, before its answer: when that answer ends the connection is
    # not idle, and the head begun keeps its header timeout (and gets a 408),
    # not the keep-alive timeout of a connection with nothing begun.
    state = make_state(limits={"keepalive_timeout": 60.0, "header_timeout": 5.0})
    gate = asyncio.Event()
    tr = fake_connect(state, lambda s, r, se: _answer_after(gate, s, r, se))
    tr.feed(GET_X + b"GET /next HTTP/1.1\r\nhost: x\r\n")  # never finishes
    now = asyncio.get_running_loop().time()
    gate.set()
    await until(lambda: tr.buffer.endswith(b"0\r\n\r\n"))
    tr.take()
    tr.protocol.check_deadline(now + 4)
    assert not tr.closed
    tr.protocol.check_deadline(now + 6)
    assert tr.closed and tr.take().startswith(b"HTTP/1.1 408 ")


async def test_a_request_target_split_over_reads_is_one_target():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["path"], scope["query_string"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    tr = fake_connect(make_state(), app)
    for part in (b"GE", b"T /a/", b"b?x", b"=1 HTTP/1.1\r\nhost: x\r\n\r\nGET /c", b" HTTP/1.1\r\n",
                 b"host: x\r\n\r\n"):
        tr.feed(part)
        await settle()
    assert tr.take().count(b"HTTP/1.1 204") == 2
    assert seen == [("/a/b", b"x=1"), ("/c", b"")]


@pytest.mark.parametrize(("head", "version"), [
    (b"GET / HTTP/1.1\r\nhost: x\r\n", "1.1"),
    (b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n", "1.1"),
    (b"GET / HTTP/1.1\r\nhost: x\r\nconnection: keep-alive\r\n", "1.1"),
    (b"GET / HTTP/1.0\r\n", "1.0"),
    # llhttp keeps these alive: the version is not 1.1 for that
    (b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n", "1.0"),
    (b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n", "1.0"),
    (b"GET / HTTP/1.0\r\nkeep-alive: 5\r\n", "1.0"),
])
async def test_the_scope_names_the_request_http_version(head, version):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["http_version"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    tr = fake_connect(make_state(), app)
    tr.feed(head + b"\r\n")
    await until(lambda: bool(seen) and tr.buffer.endswith(b"ok"))
    # The second request on the connection (if it stays open) is read alike.
    if not tr.closed:
        tr.feed(head + b"\r\n")
        await until(lambda: len(seen) == 2)
    assert set(seen) == {version}


# -- the response head's cached lines, and the scope from the connection's copy ------

def _answer_with(headers):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": headers(scope)})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_a_bytearray_field_value_is_sent_as_it_is():
    # Not hashable: it cannot be a key of the cache of field lines.
    tr = fake_connect(make_state(), _answer_with(lambda s: [(b"x-a", bytearray(b"1"))]))
    for _ in range(2):
        tr.feed(GET_X)
        await settle()
        assert b"\r\nx-a: 1\r\n" in tr.take()


@pytest.mark.parametrize("value", [b"2", bytearray(b"2"), b"two"])
async def test_an_apps_content_length_is_read_alike_each_time(value):
    # Cached by the value (exchange._LENGTHS): a bytearray, not hashable, is
    # read without the cache, and a value that is no number is refused again.
    tr = fake_connect(make_state(), _answer_with(lambda s: [(b"content-length", value)]))
    for _ in range(2):
        tr.feed(GET_X)
        await settle()
        out = tr.take()
        if value == b"two":
            assert out.startswith(b"HTTP/1.1 500 ")
            break
        assert b"\r\ncontent-length: 2\r\n" in out and out.endswith(b"\r\n\r\nok")


async def test_content_length_values_are_each_responses_own_and_their_cache_stays_bounded():
    from zion.http import exchange

    async def app(scope, receive, send):
        n = scope["query_string"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", n)]})
        await send({"type": "http.response.body", "body": b"x" * int(n)})

    tr = fake_connect(make_state(), app)
    for i in [*range(exchange._LENGTHS_MAX + 50), 7]:
        tr.feed(b"GET /?%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)
        await settle()
        out = tr.take()
        assert b"\r\ncontent-length: %d\r\n" % i in out
        assert out.endswith(b"\r\n\r\n" + b"x" * i)
        assert len(exchange._LENGTHS) <= exchange._LENGTHS_MAX


async def test_field_lines_are_each_responses_own_and_their_cache_stays_bounded():
    from zion.http import h1

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-n", scope["query_string"]), (b"x-same", b"1")]})
        await send({"type": "http.response.body", "body": b"x" * int(scope["query_string"])})

    tr = fake_connect(make_state(), app)
    for i in [*range(h1._LINES_MAX + 50), 7]:
        tr.feed(b"GET /?%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)
        await settle()
        out = tr.take()
        assert b"\r\nx-n: %d\r\nx-same: 1\r\n" % i in out
        assert b"\r\ncontent-length: %d\r\n" % i in out and out.endswith(b"\r\n" + b"x" * i)
        assert len(h1._LINES) <= h1._LINES_MAX and len(h1._LENGTH_LINES) <= h1._LINES_MAX


async def test_request_targets_are_each_requests_own_and_their_cache_stays_bounded():
    from zion.http import h1

    seen = []
    tr = fake_connect(make_state(), _answer_with(
        lambda s: seen.append((s["path"], s["raw_path"], s["query_string"])) or []))
    for i in [*range(h1._TARGETS_MAX + 50), 3]:
        tr.feed(b"GET /p%%20%d?q=%d HTTP/1.1\r\nhost: x\r\n\r\n" % (i, i))
        await settle()
        assert tr.take().startswith(b"HTTP/1.1 200")
        assert seen[-1] == (f"/p {i}", b"/p%%20%d" % i, b"q=%d" % i)
        assert len(h1._TARGETS) <= h1._TARGETS_MAX

@pytest.mark.parametrize(("head", "version", "method", "path", "raw_path", "query"), [
    (b"GET /a%20b?q=1 HTTP/1.1\r\nhost: x\r\nx-one: 1\r\n", "1.1", "GET", "/a b", b"/a%20b",
     b"q=1"),
    (b"POST /p HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 0\r\n", "1.0", "POST",
     "/p", b"/p", b""),
    # a method not in h1._METHODS
    (b"PROPFIND /d HTTP/1.1\r\nhost: x\r\n", "1.1", "PROPFIND", "/d", b"/d", b""),
])
async def test_the_scope_is_the_one_rules_http_scope_makes(head, version, method, path, raw_path,
                                                           query):
    # h1.py copies the connection's scope and sets each request's keys.
    from zion.http import rules
    from zion.http.files import PATHSEND

    seen = []
    state = make_state()
    state.lifespan_state["db"] = "x"
    tr = fake_connect(state, _answer_with(lambda s: seen.append(s) or []))
    for _ in range(2):
        tr.feed(head + b"\r\n")
        await settle()
    assert len(seen) == 2 and seen[0] is not seen[1]
    scope = seen[1]
    headers = [tuple(line.split(b": ")) for line in head.split(b"\r\n")[1:-1]]
    expected = rules.http_scope(state, version, method, path, raw_path, query,
                                [(n.lower(), v) for n, v in headers],
                                ("127.0.0.1", 40000), ("127.0.0.1", 8443), {PATHSEND: {}},
                                False)
    assert scope == expected and list(scope) == list(expected)
    assert scope["state"] is not seen[0]["state"] and scope["state"] is not state.lifespan_state
    assert scope["extensions"] is not seen[0]["extensions"]


# -- the field count, and the idle deadline from the sweep after a response ---------

@pytest.mark.parametrize(("fields", "status"), [(5, b"200"), (6, b"431")])
async def test_more_fields_than_max_headers_get_431(fields, status):
    tr = fake_connect(make_state(limits={"max_headers": 5}), _answer_with(lambda s: []))
    tr.feed(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(fields)) + b"\r\n")
    await settle()
    out = tr.take()
    assert out.startswith(b"HTTP/1.1 " + status)
    assert (b"too many header fields" in out) == (status == b"431")


async def test_an_idle_connection_closes_keepalive_timeout_after_the_sweep_past_its_response():
    # The response's end reads no clock: the next sweep starts the idle deadline.
    state = make_state(limits={"keepalive_timeout": 5.0})
    tr = fake_connect(state, _answer_with(lambda s: []))
    tr.feed(GET_X)
    await until(lambda: tr.buffer.endswith(b"ok"))
    now = state.loop.time()
    tr.protocol.check_deadline(now + 0.5)  # the sweep after the response
    tr.protocol.check_deadline(now + 5.4)
    assert not tr.closed
    tr.protocol.check_deadline(now + 5.6)
    assert tr.closed


async def test_a_drain_right_after_a_response_closes_its_connection_after_the_grace():
    # No sweep between the response and the drain: the grace still holds.
    state = make_state(limits={"keepalive_timeout": 60.0})
    tr = fake_connect(state, _answer_with(lambda s: []))
    tr.feed(GET_X)
    await until(lambda: tr.buffer.endswith(b"ok"))
    now = state.loop.time()
    state.draining = True
    tr.protocol.shutdown()
    tr.protocol.check_deadline(now + 0.5)
    assert not tr.closed
    tr.protocol.check_deadline(now + 2)
    assert tr.closed


async def test_only_a_connections_first_request_runs_its_first_step_inside_the_read():
    # task_start for the first (a new TLS connection's tickets and response in
    # one write), create_task for the rest: fed from a loop callback, as a
    # transport's read is, outside any Task.
    seen: list[str] = []
    ran: list[int] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    tr = fake_connect(make_state(), app)
    loop = asyncio.get_running_loop()

    def read(path: bytes) -> None:
        tr.feed(b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        ran.append(len(seen))  # apps run by the time the read returns

    for i, path in enumerate((b"/1", b"/2", b"/3")):
        loop.call_soon(read, path)
        await until(lambda n=i + 1: len(seen) == n and tr.buffer.endswith(b"ok"))
        tr.take()
    assert ran == [1, 1, 2] and seen == ["/1", "/2", "/3"]


# -- a body read past the parser, timed ------------------------------------------

async def test_an_unswitched_upgrades_body_that_stops_arriving_gets_408():
    # An h2c upgrade this connection does not take: its body is read past the
    # parser (h1._upgrade_body), and timed there.
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    state = make_state(limits={"body_timeout": 8.0, "header_timeout": 60.0,
                               "keepalive_timeout": 60.0})
    tr = fake_connect(state, app)
    tr.feed(b"POST / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
            b"content-length: 10\r\n\r\nabc")
    await settle()
    now = state.loop.time()
    tr.protocol.check_deadline(now + 7)
    assert not tr.closed
    tr.protocol.check_deadline(now + 9)
    out = tr.take()
    assert out.startswith(b"HTTP/1.1 408") and b"body not received in time" in out and tr.closed


async def _headers_after_the_body(scope, receive, send) -> None:
    body = await read_body(receive)
    names = b",".join(name for name, _ in scope["headers"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": names + b"|" + body})


@pytest.mark.parametrize("split", [False, True])
async def test_a_chunked_bodys_trailer_fields_do_not_join_the_scopes_headers(split):
    """Trailer fields come after the body: the app reading scope["headers"]
    then must not find them there. In one read and split; the connection
    then serves the next request. (llhttp itself acts on trailer names: a
    content-length or transfer-encoding is a 400, connection: close is below.)"""
    state = make_state()
    tr = fake_connect(state, _headers_after_the_body)
    request = (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\nx-forwarded-for: 6.6.6.6\r\nauthorization: x\r\n"
               b"\r\n")
    for piece in ([request] if not split else [request[:60], request[60:90], request[90:]]):
        tr.feed(piece)
    await until(lambda: tr.buffer.endswith(b"|hello"))
    answer = tr.take()
    assert answer.endswith(b"host,transfer-encoding|hello")
    tr.feed(GET_X)  # still kept alive
    await until(lambda: tr.buffer.endswith(b"host|"))
    assert not tr.closed


@pytest.mark.parametrize("split", [False, True])
async def test_a_trailer_connection_close_closes_after_the_answer_instead_of_a_400(split):
    """llhttp takes a trailer `connection: close` as the client's and then
    refuses the next bytes: the answer must say close and the connection end
    there, not promise keep-alive and answer the next request with a 400."""
    state = make_state()
    tr = fake_connect(state, _headers_after_the_body)
    request = (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\nconnection: close\r\n\r\n")
    pieces = [request + GET_X] if not split else [request[:70], request[70:], GET_X]
    for piece in pieces:
        tr.feed(piece)
    await until(lambda: tr.closed)
    answer = tr.take()
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in answer.lower()
    assert answer.endswith(b"host,transfer-encoding|hello")
    assert b"400" not in answer
