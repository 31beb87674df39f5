"""What a hostile HTTP/2 client can make a connection hold or skip
(zion/http/h2.py), found by the issue-19 acceptance run (h2spec 2.6.0 among
its clients). The h2 client and raw frames drive
zion's H2Protocol over a fake transport (tests/support/h2peer.py)."""

from __future__ import annotations

from typing import Any

from hyperframe.frame import (
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
)

from tests.support.fake_transport import make_state, settle
from tests.support.h2peer import FakePeer, parse_frames

PROTOCOL_ERROR = 1
_BLOCK = b"\x82\x87\x84\x01\x09localhost"  # GET https / localhost


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_self_dependent_priority_frames_on_idle_streams_are_not_remembered() -> None:
    """RFC 9113 5.3.1 / h2spec 5.3.1 #2: a PRIORITY frame naming its own,
    idle, stream as its parent. zion kept each such id until the stream
    opened (to reset it then): 500,000 of these 14-byte frames on one
    connection held +34 MiB in the worker for the connection's life. A
    stream error may be treated as a connection error (RFC 9113 5.4.1):
    GOAWAY PROTOCOL_ERROR, and nothing is kept."""
    peer = FakePeer(make_state(), _echo)
    peer.exchange()
    await settle(2)
    peer.tr.take()
    peer.tr.feed(b"".join(PriorityFrame(sid, depends_on=sid).serialize()
                          for sid in range(1001, 1201, 2)))
    await settle(3)
    goaways = [f for f in parse_frames(peer.tr.take()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [PROTOCOL_ERROR]
    assert peer.tr.closed and not peer.proto.self_dependent


async def test_a_self_dependent_priority_frame_on_a_closed_stream_is_dropped() -> None:
    """Its stream was answered already: nothing to reset and nothing kept;
    the connection serves on. A self-dependent stream that is open is
    still reset alone (tests/http/test_h2.py)."""
    peer = FakePeer(make_state(), _echo)
    peer.exchange()
    done = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    done.data = _BLOCK
    peer.tr.feed(done.serialize())
    await settle(3)
    assert any(isinstance(f, HeadersFrame) and f.stream_id == 1
               for f in parse_frames(peer.tr.take()))
    peer.tr.feed(PriorityFrame(1, depends_on=1).serialize())
    opened = HeadersFrame(3, flags=["END_HEADERS"])  # open, its body to come
    opened.data = _BLOCK
    peer.tr.feed(opened.serialize() + PriorityFrame(3, depends_on=3).serialize())
    await settle(3)
    sent = parse_frames(peer.tr.take())
    assert [(f.stream_id, f.error_code) for f in sent if isinstance(f, RstStreamFrame)] == [
        (3, PROTOCOL_ERROR)]
    assert not any(isinstance(f, GoAwayFrame) for f in sent)
    assert not peer.tr.closed and not peer.proto.self_dependent


async def test_an_answered_upload_the_client_stalls_does_not_hold_the_drain() -> None:
    """Issue 19.4: drain is not held up. A body over max_body_size gets its
    413, then zion reads and drops the rest (so curl shows the 413) for up to
    body_timeout. A client that stops sending kept a draining worker up for
    that long (8 s by default; seen from a real `zion serve`). At the final
    GOAWAY such a stream is reset NO_ERROR (RFC 9113 8.1) and the
    connection closes."""
    state = make_state(limits={"max_body_size": 1000, "body_timeout": 600})
    peer = FakePeer(state, _echo)
    sid = peer.client.request("POST", "/up", body=b"x" * 3000, end=False)  # and no more
    await peer.until(lambda: peer.client.responses[sid].ended)
    assert peer.client.responses[sid].status == 413
    assert sid in peer.proto.streams  # its body is being dropped
    peer.tr.take()
    state.draining = True
    peer.proto.shutdown()
    step1 = parse_frames(peer.tr.take())
    ping = next(f for f in step1 if type(f).__name__ == "PingFrame")
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=ping.opaque_data).serialize())
    await settle(3)
    sent = parse_frames(peer.tr.take())
    assert [(f.stream_id, f.error_code) for f in sent if isinstance(f, RstStreamFrame)] == [
        (sid, 0)]
    assert peer.tr.closed and state.connections == set()


async def test_an_upload_answered_after_the_final_goaway_does_not_hold_the_drain() -> None:
    """The same when the 413 comes after the final GOAWAY: the stream was in
    flight (the client still sending) when the drain began."""
    state = make_state(limits={"max_body_size": 1000, "body_timeout": 600})
    peer = FakePeer(state, _echo)
    sid = peer.client.request("POST", "/up", body=b"x" * 500, end=False)
    await peer.run(3)
    state.draining = True
    peer.proto.shutdown()
    ping = next(f for f in parse_frames(peer.tr.take()) if type(f).__name__ == "PingFrame")
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=ping.opaque_data).serialize())
    await settle(3)
    assert [type(f).__name__ for f in parse_frames(peer.tr.take())] == ["GoAwayFrame"]
    assert not peer.tr.closed  # the upload is in flight
    peer.client.h2.send_data(sid, b"y" * 1000)  # past max_body_size, and no more
    peer.tr.feed(peer.client.h2.data_to_send())
    await settle(3)
    sent = parse_frames(peer.tr.take())
    assert any(isinstance(f, HeadersFrame) and f.stream_id == sid for f in sent)  # the 413
    assert [(f.stream_id, f.error_code) for f in sent if isinstance(f, RstStreamFrame)] == [
        (sid, 0)]
    assert peer.tr.closed and state.connections == set()


async def test_a_priority_frame_on_stream_0_is_a_connection_error() -> None:
    """RFC 9113 6.3: PRIORITY on stream 0 is a connection error
    PROTOCOL_ERROR (h2spec 6.3 #1); zttp ignored it, whatever its parent."""
    for parent in (0, 1):
        peer = FakePeer(make_state(), _echo)
        peer.exchange()
        await settle(2)
        peer.tr.take()
        # (hyperframe will not build it.) Length 5, type PRIORITY, stream 0.
        peer.tr.feed(b"\x00\x00\x05\x02\x00\x00\x00\x00\x00" + parent.to_bytes(4, "big") + b"\x0f")
        await settle(3)
        goaways = [f for f in parse_frames(peer.tr.take()) if isinstance(f, GoAwayFrame)]
        assert [g.error_code for g in goaways] == [PROTOCOL_ERROR], parent
        assert peer.tr.closed


async def test_new_streams_held_during_a_hand_over_pause_reading() -> None:
    """Past 3,000 streams zion hands the connection to a fresh zttp codec;
    until the old codec's streams finish, new streams' frames are held
    (zttp_shim.FrameRouter). Past 64 KiB held, the socket is not read
    (PauseReason.HANDOVER), so a client cannot pile up request bodies in
    the worker while an old stream keeps the hand-over waiting; reading
    resumes when the held frames go to the fresh codec."""
    release: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while scope["path"] == "/held" and not release:
            await settle(1)
        await _echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    held = peer.client.request(path="/held")
    await peer.until_hand_over()
    router = peer.proto.router
    assert router is not None  # the hand-over waits for /held
    late = [peer.client.request("POST", "/up", body=b"b" * 16384) for _ in range(8)]
    await peer.run(3)
    assert len(router.held) > 65536 and peer.tr.read_paused
    assert not any(peer.client.responses[s].ended for s in late)
    release.append(1)
    await peer.until(lambda: all(peer.client.responses[s].ended for s in [held, *late]))
    assert not peer.tr.read_paused and peer.proto.recycled == 1


async def test_a_hand_over_given_up_reads_again() -> None:
    """A hand-over an old stream keeps waiting past keepalive_timeout ends
    with the graceful GOAWAY; the held streams are dropped (above its last
    stream id) and so is their pause: the socket is read again (the PING's
    ACK, the client's resets and close)."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while scope["path"] == "/held":
            await settle(1)
        await _echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    peer.client.request(path="/held")
    await peer.until_hand_over()
    assert peer.proto.router is not None
    for _ in range(8):
        peer.client.request("POST", "/up", body=b"b" * 16384)
    await peer.run(3)
    assert peer.tr.read_paused
    peer.tr.take()
    peer.proto.check_deadline(peer.proto.handover_at + peer.proto.limits.keepalive_timeout)
    ping = next(f for f in parse_frames(peer.tr.take()) if type(f).__name__ == "PingFrame")
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=ping.opaque_data).serialize())
    assert [type(f).__name__ for f in parse_frames(peer.tr.take())] == ["GoAwayFrame"]
    assert peer.proto.router is None and not peer.tr.read_paused
