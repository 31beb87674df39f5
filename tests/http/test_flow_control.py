"""One pause flag per reason (zion/http/flow_control.py): reading stops at
the first reason and resumes only when none is left. Each test holds two
reasons at once and lifts the other one, so deleting any one reason's pause
(or lifting it too early) leaves reading on and fails exactly one test."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.fake_transport import connect, make_state, settle
from tests.support.h2peer import FakePeer
from zion.http.flow_control import PauseReason, ReadPauses

GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def test_reading_resumes_only_when_no_reason_is_left() -> None:
    tr = _Transport()
    pauses = ReadPauses(tr)
    pauses.pause(PauseReason.BODY_UNREAD)
    pauses.pause(PauseReason.WRITE_BUFFER_FULL)
    pauses.resume(PauseReason.BODY_UNREAD)
    assert not tr.reading and pauses.named() == PauseReason.WRITE_BUFFER_FULL
    pauses.resume(PauseReason.BODY_UNREAD)  # lifting a reason twice changes nothing
    assert not tr.reading
    pauses.resume(PauseReason.WRITE_BUFFER_FULL)
    assert tr.reading and not pauses


def _held_app(release: list[int], read_body: bool = False) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while not release:
            await asyncio.sleep(0)
        if read_body:
            while (await receive()).get("more_body"):
                pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


async def test_write_buffer_full_holds_reading_when_the_app_takes_its_body() -> None:
    release: list[int] = []
    tr = connect(make_state(), _held_app(release, read_body=True))
    tr.feed(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n" + b"x" * 100000)
    await settle()
    assert tr.read_paused  # the app has not read its body
    tr.protocol.pause_writing()  # and the client does not read our answers
    release.append(1)  # the app reads its body: BODY_UNREAD is lifted...
    await settle(5)
    assert tr.read_paused  # ...but our write buffer is still full
    tr.protocol.resume_writing()
    assert not tr.read_paused


async def test_an_unread_body_holds_reading_when_the_write_buffer_drains() -> None:
    release: list[int] = []
    tr = connect(make_state(), _held_app(release))
    tr.feed(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n" + b"x" * 100000)
    await settle()
    tr.protocol.pause_writing()
    tr.protocol.resume_writing()  # WRITE_BUFFER_FULL lifted...
    assert tr.read_paused  # ...the 100 KB the app has not read still hold it


async def test_a_pipelined_request_holds_reading_when_the_write_buffer_drains() -> None:
    release: list[int] = []
    tr = connect(make_state(), _held_app(release))
    tr.feed(GET * 2)  # the second waits for the first
    await settle()
    tr.protocol.pause_writing()
    tr.protocol.resume_writing()
    assert tr.read_paused
    release.append(1)
    await settle(10)
    assert tr.take().count(b"HTTP/1.1 200") == 2 and not tr.read_paused


async def test_bytes_after_a_last_request_hold_reading_when_the_write_buffer_drains() -> None:
    release: list[int] = []
    tr = connect(make_state(), _held_app(release))
    tr.feed(b"GET / HTTP/1.0\r\n\r\n" + b"\x00garbage")
    await settle()
    tr.protocol.pause_writing()
    tr.protocol.resume_writing()
    assert tr.read_paused  # the connection ends after this answer: nothing more is read


async def test_http2_stops_reading_while_the_write_buffer_is_full() -> None:
    peer = FakePeer(make_state())
    peer.proto.pause_writing()
    assert peer.tr.read_paused
    peer.proto.resume_writing()
    assert not peer.tr.read_paused
