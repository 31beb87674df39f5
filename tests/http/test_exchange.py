"""The exchange over a fake transport: the app runs in a real Task, spec 2.4
disconnects, response framing and header checks, write back-pressure."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import anyio
import pytest

from tests.support.asgi import read_body
from tests.support.fake_transport import connect, make_state, settle, until

GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def test_app_runs_inside_a_task_from_its_first_line():
    seen: dict[str, Any] = {}

    async def app(scope, receive, send):
        seen["task"] = asyncio.current_task()
        seen["thread"] = await anyio.to_thread.run_sync(lambda: 42)
        async with asyncio.timeout(5):
            await receive()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(0))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    tr = connect(make_state(), app)
    tr.feed(GET)
    await until(lambda: tr.buffer.endswith(b"ok"))
    assert isinstance(seen["task"], asyncio.Task) and seen["thread"] == 42


async def body_length(scope, receive, send):
    """Reads the whole body, then answers its length and whether it ran in a Task."""
    body = await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"len=%d task=%d" % (
        len(body), asyncio.current_task() is not None)})


async def test_body_with_the_headers_or_later_gives_the_same_answer():
    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n"
    answers = []
    for chunks in ([head + b"hello"], [head, b"hel", b"lo"]):
        tr = connect(make_state(), body_length)
        for chunk in chunks:
            tr.feed(chunk)
            await settle()
        answers.append(tr.take().split(b"\r\n\r\n", 1)[1])
    assert answers == [b"len=5 task=1", b"len=5 task=1"]


async def test_a_body_that_ends_in_a_later_read_wakes_the_waiting_app():
    # The last chunk (0 CRLF CRLF) comes alone, after the app has taken
    # "hello" and waits again: only the message's end can wake it.
    tr = connect(make_state(), body_length)
    tr.feed(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await settle()
    tr.feed(b"0\r\n\r\n")
    await until(lambda: tr.buffer.endswith(b"len=5 task=1"))


async def test_send_after_disconnect_raises_oserror_and_receive_says_disconnect():
    result: dict[str, Any] = {}
    gone = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await gone.wait()
        result["receive"] = await receive()
        try:
            await send({"type": "http.response.body", "body": b"b", "more_body": True})
        except OSError as exc:
            result["send"] = exc
            raise

    state = make_state()
    tr = connect(state, app)
    tr.feed(GET)
    await settle()
    tr.protocol.connection_lost(None)
    gone.set()
    await settle()
    assert result["receive"] == {"type": "http.disconnect"}
    assert isinstance(result["send"], OSError)
    assert not state.tasks  # the request task ended
    assert state.slot.inflight == 0


@pytest.mark.parametrize("evil", [
    (b"x-evil", b"a\r\nset-cookie: stolen=1"),
    (b"x-evil", b"a\nset-cookie: stolen=1"),  # a lone LF ends a field line for many clients
    (b"x-evil", b"a\rset-cookie: stolen=1"),
    (b"x-evil", b"stolen\r"),  # right before zion's own CRLF
    (b"x-evil", b"stolen\n"),
    (b"x-evil", b"\r\nstolen"),
    (b"x-ev\r\nil", b"stolen"),  # in the name
])
async def test_crlf_in_a_response_header_is_refused(evil):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), evil, (b"x-after", b"1")]})
        await send({"type": "http.response.body", "body": b"x"})

    tr = connect(make_state(), app)
    tr.feed(GET)
    await settle()
    out = tr.take()
    assert _status(out) == 500 and b"stolen" not in out and tr.closed


async def test_a_slow_reader_pauses_the_app_instead_of_growing_memory():
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(10):
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            sent.append(i)
        await send({"type": "http.response.body", "body": b""})

    tr = connect(make_state(), app)
    tr.protocol.pause_writing()  # the transport's buffer is over its high-water mark
    tr.feed(GET)
    await settle()
    assert sent == []  # the first chunk is written, then the app waits
    tr.protocol.resume_writing()
    await settle(30)
    assert sent == list(range(10))


async def test_max_connections_answers_503():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = make_state(limits={"max_connections": 1})
    first = connect(state, app)
    second = connect(state, app)
    for tr in (first, second):
        tr.feed(GET)
    await settle()
    assert _status(first.take()) == 200
    assert _status(second.take()) == 503 and second.closed


async def test_h2c_upgrade_is_served_as_http11_without_switching():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["type"].encode()})

    tr = connect(make_state(), app)
    tr.feed(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\n"
            b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")
    await settle()
    out = tr.take()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"http")
    assert b"101" not in out.split(b"\r\n", 1)[0]


async def test_app_that_raises_before_responding_gets_500_and_worker_lives_on():
    async def app(scope, receive, send):
        raise RuntimeError("boom")

    state = make_state()
    tr = connect(state, app)
    tr.feed(GET)
    await settle()
    assert _status(tr.take()) == 500 and tr.closed and not state.tasks


async def test_pipelined_requests_are_answered_in_order():
    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    tr = connect(make_state(), app)
    tr.feed(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
    await settle(20)
    out = tr.take()
    assert out.index(b"/slow") < out.index(b"/fast")


async def test_a_pipelining_client_that_never_reads_stops_being_read():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100})

    tr = connect(make_state(), app)
    tr.feed(GET * 50)  # fifty pipelined requests in one read
    await settle()
    answered = tr.take().count(b"HTTP/1.1 200")
    assert answered >= 1
    tr.protocol.pause_writing()  # the client stopped reading: our buffer is full
    assert tr.read_paused
    await settle(20)
    during = tr.take().count(b"HTTP/1.1 200")
    assert during <= 1  # at most the one already started
    tr.protocol.resume_writing()
    await until(lambda: tr.buffer.count(b"HTTP/1.1 200") == 50 - answered - during)


async def test_bytes_after_connection_close_are_ignored_not_a_400():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    tr = connect(make_state(), app)
    tr.feed(b"GET /first HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
    await settle()
    out = tr.take()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"/first")
    assert b"400" not in out and b"/second" not in out and tr.closed


async def test_a_closed_connection_stops_counting_at_once():
    state = make_state()
    tr = connect(state)
    assert len(state.connections) == 1
    tr.protocol.close()  # TLS shutdown may take a while; the count must not
    assert len(state.connections) == 0 and state.slot.conns == 0


async def test_a_body_that_stops_arriving_gets_408():
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    state = make_state(limits={"body_timeout": 8.0})
    tr = connect(state, app)
    proto = tr.protocol
    tr.feed(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
    await settle()
    proto.check_deadline(state.loop.time() + 5)
    assert not tr.closed
    proto.deadline = state.loop.time() - 1  # as if the 8 s were nearly over...
    tr.feed(b"def")  # ...when more bytes come: the deadline is 8 s after them
    await settle()
    proto.check_deadline(state.loop.time() + 7.5)
    assert not tr.closed
    proto.check_deadline(state.loop.time() + 8.5)
    out = tr.take()
    assert _status(out) == 408 and b"body not received in time" in out and tr.closed


async def test_a_client_that_never_takes_the_response_is_cut_at_send_timeout():
    state = make_state(limits={"send_timeout": 30.0, "header_timeout": 100.0})
    tr = connect(state)
    tr.protocol.pause_writing()
    now = state.loop.time()
    tr.protocol.check_deadline(now + 20)
    assert not tr.closed
    tr.protocol.check_deadline(now + 31)
    assert tr.aborted


async def test_operator_headers_and_no_server_or_date_header():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = make_state(server={"headers": "x-frame-options: DENY", "server_header": False,
                               "date_header": False})
    tr = connect(state, app)
    tr.feed(GET)
    await settle()
    head = tr.take().split(b"\r\n\r\n")[0].lower()
    assert b"x-frame-options: deny" in head
    assert b"server:" not in head and b"date:" not in head


async def test_a_request_at_the_heartbeats_idle_pace_wakes_it_once():
    # A request makes the worker busy: if the heartbeat was at its idle pace,
    # it is woken (the demux would take its old heartbeat for a blocked loop);
    # at the busy pace the per-request path only reads a flag.
    seen = []

    async def app(scope, receive, send):
        seen.append(state.slot.inflight)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    state = make_state()
    woken = []

    def wake() -> None:
        woken.append(state.slot.inflight)
        state.heartbeat_slow = False

    state.became_busy = wake
    state.heartbeat_slow = True
    tr = connect(state, app)
    tr.feed(GET)
    await settle()
    tr.feed(GET)
    await settle()
    assert seen == [1, 1] and woken == [1]
    assert state.slot.inflight == 0


async def test_trailers_end_a_chunked_http11_response_and_head_sends_no_body():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"9")]})

    tr = connect(make_state(), app)
    tr.feed(GET)
    await until(lambda: tr.buffer.endswith(b"\r\n\r\n") and b"x-sum" in tr.buffer)
    head, body = tr.take().split(b"\r\n\r\n", 1)
    # Names lowercased, the app's connection-specific field dropped (RFC 9110 7.6.1).
    assert b"content-type: text/plain" in head and b"keep-alive" not in head
    assert body == b"3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n" and not tr.closed
    tr.feed(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
    await until(lambda: tr.buffer.endswith(b"\r\n\r\n"))
    await settle()
    head, body = tr.take().split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head and body == b""


async def test_the_apps_field_names_go_out_lowercase_and_their_cache_stays_bounded():
    from zion.http import exchange

    async def app(scope, receive, send):
        name = b"X-Name-" + scope["query_string"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(name, b"1"), (b"Content-Type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"x"})

    tr = connect(make_state(), app)
    for i in range(exchange._NAMES_MAX + 50):
        tr.feed(b"GET /?%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)
        await settle()
        out = tr.take()
        assert b"\r\nx-name-%d: 1\r\ncontent-type: text/plain\r\n" % i in out
        assert len(exchange._NAMES) <= exchange._NAMES_MAX



def test_a_requests_task_is_what_create_task_makes_or_the_apps_factorys():
    # On the worker's loop (WorkerLoop) a request's Task is made without
    # loop.create_task while no task factory is set (exchange.py run). It
    # must still be what create_task makes (a "Task-N" name, in all_tasks),
    # and a factory the app sets must make the next request's Task.
    # Requests after a connection's first (task_start runs that one's first
    # step at once).
    from zion.worker import WorkerLoop

    seen: list[tuple[asyncio.Task[Any], str, bool]] = []
    made: list[asyncio.Task[Any]] = []

    async def app(scope, receive, send):
        task = asyncio.current_task()
        assert task is not None
        seen.append((task, task.get_name(), task in asyncio.all_tasks()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def factory(loop, coro, context=None):
        task = asyncio.Task(coro, loop=loop, context=context)
        made.append(task)
        return task

    async def requests(loop: WorkerLoop) -> None:
        state = make_state()
        loop.attach(state)
        tr = connect(state, app)
        tr.feed(GET)
        await until(lambda: len(seen) == 1)
        tr.feed(GET)
        await until(lambda: len(seen) == 2)
        assert state.plain_tasks
        _, name, registered = seen[1]
        assert name.startswith("Task-") and registered and not made
        loop.set_task_factory(factory)
        tr.feed(GET)
        await until(lambda: len(seen) == 3)
        assert made == [seen[2][0]]
        loop.set_task_factory(None)
        tr.feed(GET)
        await until(lambda: len(seen) == 4)
        assert made == [seen[2][0]] and state.plain_tasks

    loop = WorkerLoop()
    try:
        loop.run_until_complete(requests(loop))
    finally:
        loop.close()


@pytest.mark.parametrize("status", [HTTPStatus.NOT_FOUND, "404"])
async def test_a_status_that_is_not_an_int_is_taken_as_one(status):
    # send() calls int() only for what is not an int already: an IntEnum
    # (HTTPStatus), or a number as text, still answers and counts as its int.
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    state = make_state()
    tr = connect(state, app)
    tr.feed(GET)
    await until(lambda: tr.buffer.endswith(b"no"))
    assert tr.take().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert state.counters.responses_4xx == 1
