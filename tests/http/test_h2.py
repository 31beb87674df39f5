"""HTTP/2 streams as exchanges, over a fake transport with the pure-Python
`h2` client on the other side: framing, flow control, limits and floods."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from types import SimpleNamespace
from typing import Any

import h2.errors
import h2.exceptions
import h2.settings
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.support.asgi import read_body
from tests.support.fake_transport import FakeTransport, make_state, settle, until
from tests.support.h2peer import Client, FakePeer
from tests.support.h2peer import parse_frames as frames

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await read_body(receive)
    headers = dict(scope["headers"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-version", scope["http_version"].encode()),
                            (b"x-host", headers.get(b"host", b"")),
                            (b"x-cookie", headers.get(b"cookie", b"")),
                            (b"x-path", scope["path"].encode()),
                            (b"x-query", scope["query_string"]),
                            (b"Connection", b"keep-alive"),  # never sent over HTTP/2
                            (b"Transfer-Encoding", b"chunked")]})
    await send({"type": "http.response.body", "body": hashlib.sha256(body).hexdigest().encode(),
                "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def test_a_request_is_an_exchange_with_an_http2_scope():
    peer = FakePeer(make_state(), echo)
    sid = peer.client.request(path="/a%20b?x=1", headers=[("cookie", "a=1"), ("cookie", "b=2")])
    r = peer.client.responses[sid]
    await peer.until(lambda: r.ended)
    assert r.status == 200
    assert r.header(b"x-version") == b"2" and r.header(b"x-host") == b"localhost"
    assert r.header(b"x-path") == b"/a b" and r.header(b"x-query") == b"x=1"
    assert r.header(b"x-cookie") == b"a=1; b=2"  # crumbs joined (RFC 9113 8.2.3)
    names = [n for n, _ in r.headers]
    assert b"connection" not in names and b"transfer-encoding" not in names
    assert r.header(b"server") == b"zion" and r.header(b"date")
    assert bytes(r.body) == hashlib.sha256(b"").hexdigest().encode()


async def test_the_scope_is_the_one_rules_http_scope_makes():
    # h2.py copies the connection's scope and sets each request's keys.
    from zion.http import rules
    from zion.http.files import PATHSEND

    seen = []

    async def app(scope, receive, send):
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    state = make_state()
    state.lifespan_state["db"] = "x"
    peer = FakePeer(state, app)
    for method, path, fields in (("GET", "/a%20b?q=1", [("x-one", "1")]),
                                 ("POST", "/p", []), ("PROPFIND", "/d?", [("x-two", "2")])):
        sid = peer.client.request(method, path, headers=fields)
        await peer.until(lambda sid=sid: peer.client.responses[sid].ended)
        scope = seen[-1]
        raw, _, query = path.encode().partition(b"?")
        expected = rules.http_scope(
            state, "2", method, raw.decode().replace("%20", " "), raw, query,
            [*((n.encode(), v.encode()) for n, v in fields), (b"host", b"localhost")],
            ("127.0.0.1", 40000), ("127.0.0.1", 8443),
            {"http.response.trailers": {}, PATHSEND: {}}, False)
        assert scope == expected and list(scope) == list(expected)
    assert len(seen) == 3 and seen[0]["state"] is not seen[1]["state"]
    assert seen[0]["extensions"] is not seen[1]["extensions"]


async def test_an_apps_own_server_header_wins_and_operator_headers_are_added():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"Server", b"mine")] if scope["path"] == "/own" else []})
        await send({"type": "http.response.body", "body": b""})

    peer = FakePeer(make_state(server={"headers": "X-Frame-Options: DENY"}), app)
    ours = peer.client.request(path="/")  # first: the later one takes the cached headers
    own = peer.client.request(path="/own")
    await peer.until(lambda: all(r.ended for r in peer.client.responses.values()))
    rs = peer.client.responses
    assert [v for n, v in rs[own].headers if n == b"server"] == [b"mine"]
    assert [v for n, v in rs[ours].headers if n == b"server"] == [b"zion"]
    assert rs[own].header(b"x-frame-options") == rs[ours].header(b"x-frame-options") == b"DENY"


async def test_the_preface_advertises_our_limits_and_no_extended_connect():
    peer = FakePeer(make_state(limits={"h2_max_streams": 7}))
    await peer.run(2)
    settings = peer.client.remote_settings
    assert settings[0x3] == 7 and settings[0x8] == 0 and settings[0x6] == 16384


async def test_alpn_h2_hands_a_new_connection_to_http2():
    from zion.http.connection_start import ConnectionStart
    from zion.http.h2 import H2Protocol

    state = make_state()
    start = ConnectionStart(state)
    tr = FakeTransport(start)
    tr.extra["ssl_object"] = SimpleNamespace(selected_alpn_protocol=lambda: "h2",
                                             session_reused=False)
    start.connection_made(tr)  # type: ignore[arg-type]
    assert isinstance(tr.protocol, H2Protocol) and state.connections == {tr.protocol}
    assert tr.take()[3] == 0x4  # our SETTINGS frame, the server preface


async def test_many_concurrent_streams_with_bodies_both_ways():
    peer = FakePeer(make_state(), echo, window=2**24)
    bodies = {}
    for i in range(40):
        body = bytes([i]) * (1000 + 997 * i)
        sid = peer.client.request("POST", f"/{i}", end=False)
        bodies[sid] = body
    for sid, body in bodies.items():
        await peer.upload(sid, body)
    await peer.until(lambda: all(r.ended for r in peer.client.responses.values()))
    for sid, body in bodies.items():
        assert bytes(peer.client.responses[sid].body) == hashlib.sha256(body).hexdigest().encode()


async def test_a_large_body_both_ways_honours_flow_control():
    size = 3 * 1024 * 1024

    async def app(scope, receive, send):
        got = hashlib.sha256()
        while True:
            msg = await receive()
            got.update(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-sha", got.hexdigest().encode())]})
        for i in range(size // 65536):
            await send({"type": "http.response.body", "body": bytes([i % 251]) * 65536,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    peer = FakePeer(make_state(), app)
    sid = peer.client.request("POST", "/", end=False)
    upload = bytes(range(256)) * (size // 256)
    await peer.upload(sid, upload)
    r = peer.client.responses[sid]
    await peer.until(lambda: r.ended)
    assert r.header(b"x-sha") == hashlib.sha256(upload).hexdigest().encode()
    expect = hashlib.sha256(b"".join(bytes([i % 251]) * 65536 for i in range(size // 65536)))
    assert hashlib.sha256(r.body).hexdigest() == expect.hexdigest()


async def test_a_slow_reader_on_one_stream_does_not_stall_the_others():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        n = 40 if scope["path"] == "/big" else 1
        for _ in range(n):
            await send({"type": "http.response.body", "body": b"x" * 16384, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    peer = FakePeer(make_state(), app, window=2**20)
    peer.client.auto_ack = False  # the client reads nothing on /big...
    big = peer.client.request(path="/big")
    await peer.run(20)
    assert not peer.client.responses[big].ended
    peer.client.h2.increment_flow_control_window(2**24)  # ...but opens the connection
    small = [peer.client.request(path="/small") for _ in range(5)]
    await peer.until(lambda: all(peer.client.responses[s].ended for s in small))
    assert not peer.client.responses[big].ended
    assert len(peer.client.responses[big].body) < 200_000  # bounded by its window
    peer.client.h2.increment_flow_control_window(2**20, big)
    peer.client.auto_ack = True
    await peer.until(lambda: peer.client.responses[big].ended)


async def test_a_zero_window_stall_resets_the_stream_after_send_timeout():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(20):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    state = make_state(limits={"send_timeout": 0.2})
    peer = FakePeer(state, app)
    peer.client.auto_ack = False
    sid = peer.client.request()
    r = peer.client.responses[sid]
    await peer.until(lambda: r.reset is not None)
    assert r.reset == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    peer.client.auto_ack = True
    peer.client.h2.increment_flow_control_window(65535)  # what stream 1 took
    ok = peer.client.request()
    await peer.until(lambda: peer.client.responses[ok].ended)


async def test_streams_whose_windows_stay_shut_hold_about_write_buffer_high_together():
    """Issue 19.1, per connection: fifty streams' windows stay shut (the
    client takes the bytes but never sends WINDOW_UPDATE); what waits in zttp
    for those windows stays near write_buffer_high for the whole connection,
    not fifty times a stream's share."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    state = make_state(limits={"write_buffer_high": 65536, "h2_max_streams": 64})
    peer = FakePeer(state, app)
    peer.client.auto_ack = False
    peer.client.h2.increment_flow_control_window(2**30)
    sids = [peer.client.request(path=f"/{i}") for i in range(50)]
    await peer.run(40)
    rs = peer.client.responses
    assert all(len(rs[s].body) == 65535 for s in sids)  # each stream's first window
    parked = sum(s.handle.pending_bytes or 0 for s in peer.proto.streams.values())
    assert 0 < parked <= 65536 + 50 * 4096, parked
    for s in sids:  # and each finishes once its window opens
        peer.client.h2.increment_flow_control_window(2**20, s)
    peer.client.auto_ack = True
    await peer.until(lambda: all(rs[s].ended for s in sids))
    assert all(len(rs[s].body) == 409600 for s in sids)


async def test_a_client_that_does_not_take_our_bytes_is_not_read_either():
    """A whole answer sent in one send() never waits in drain(): were zion to
    go on reading, a client that asks and never reads would pile answers up
    in the transport. pause_writing stops reading; resume_writing restarts it."""
    peer = FakePeer(make_state(), echo)
    peer.proto.pause_writing()
    assert peer.tr.read_paused
    peer.proto.resume_writing()
    assert not peer.tr.read_paused


async def test_trailers_head_204_and_304():
    async def app(scope, receive, send):
        path = scope["path"]
        if path == "/trailers":
            await send({"type": "http.response.start", "status": 200, "headers": [],
                        "trailers": True})
            await send({"type": "http.response.body", "body": b"data"})
            await send({"type": "http.response.trailers",
                        "headers": [(b"x-checksum", b"abc")]})
            return
        status = int(path[1:]) if path[1:].isdigit() else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"5")] if status == 200 else []})
        await send({"type": "http.response.body", "body": b"hello"})

    peer = FakePeer(make_state(), app)
    t = peer.client.request(path="/trailers")
    head = peer.client.request("HEAD", "/")
    no_content = peer.client.request(path="/204")
    not_modified = peer.client.request(path="/304")
    rs = peer.client.responses
    await peer.until(lambda: all(r.ended for r in rs.values()))
    assert rs[t].body == b"data" and rs[t].trailers == [(b"x-checksum", b"abc")]
    assert rs[head].body == b"" and rs[head].header(b"content-length") == b"5"
    assert rs[no_content].status == 204 and rs[no_content].body == b""
    assert rs[not_modified].status == 304 and rs[not_modified].body == b""


async def test_zions_own_handlers_answer_over_http2():
    def dispatch(ex):
        if ex.scope["path"] == "/file":
            ex.send_head(200, [(b"content-type", b"text/plain"), (b"etag", b'"1"')], 6)
            ex.write_raw(b"abc")
            ex.write_raw(b"def")
            ex.complete()
        elif ex.scope["path"] == "/fail":
            ex.fail(503, "busy")
        else:
            ex.respond(405, b"no\n", extra=[(b"allow", b"GET, HEAD")])

    state = make_state()
    peer = FakePeer(state)
    state.dispatch = dispatch
    f, fail, other = (peer.client.request(path=p) for p in ("/file", "/fail", "/x"))
    rs = peer.client.responses
    await peer.until(lambda: all(r.ended for r in rs.values()))
    assert rs[f].body == b"abcdef" and rs[f].header(b"etag") == b'"1"'
    assert rs[fail].status == 503 and rs[fail].body == b"503 Service Unavailable: busy\n"
    assert rs[other].status == 405 and rs[other].header(b"allow") == b"GET, HEAD"


async def test_streams_past_the_limit_are_refused():
    async def hang(scope, receive, send):
        await receive()
        await receive()  # until the client leaves

    peer = FakePeer(make_state(limits={"h2_max_streams": 3}), hang)
    await peer.run(2)
    assert peer.client.remote_settings[0x3] == 3
    # A client that ignores what we advertised:
    peer.client.h2.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    sids = [peer.client.request() for _ in range(4)]
    await peer.until(lambda: peer.client.responses[sids[3]].reset is not None)
    assert peer.client.responses[sids[3]].reset == h2.errors.ErrorCodes.REFUSED_STREAM
    assert all(peer.client.responses[s].reset is None for s in sids[:3])


async def test_a_stream_past_the_limit_alone_in_its_read_is_refused_at_once():
    # One HEADERS frame that ends its request, alone in a read, takes
    # H2Protocol._one_request, which skips the end-of-read flush: the
    # refusal must go out by itself.
    async def hang(scope, receive, send):
        await receive()
        await receive()  # until the client leaves

    peer = FakePeer(make_state(limits={"h2_max_streams": 3}), hang)
    await peer.run(2)
    peer.client.h2.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    held = [peer.client.request() for _ in range(3)]
    await peer.run(2)
    extra = peer.client.request()
    frame = peer.client.h2.data_to_send()
    assert frame[3] == 0x1 and frame[4] == 0x5  # HEADERS, END_STREAM | END_HEADERS
    peer.tr.feed(frame)
    await peer.until(lambda: peer.client.responses[extra].reset is not None)
    assert peer.client.responses[extra].reset == h2.errors.ErrorCodes.REFUSED_STREAM
    assert all(peer.client.responses[s].reset is None for s in held)


async def test_a_header_list_over_the_limit_gets_431():
    peer = FakePeer(make_state(), echo)
    big = peer.client.request(headers=[(f"x-h{i}", "v" * 1000) for i in range(20)])
    await peer.until(lambda: peer.client.responses[big].ended)
    assert peer.client.responses[big].status == 431
    ok = peer.client.request()
    await peer.until(lambda: peer.client.responses[ok].ended)
    assert peer.client.responses[ok].status == 200


async def test_rapid_reset_gets_goaway_enhance_your_calm():
    peer = FakePeer(make_state(limits={"h2_flood_per_second": 50}), echo)
    for _ in range(60):
        sid = peer.client.request(end=False)
        peer.client.h2.reset_stream(sid)
    peer.exchange()
    await peer.run(2)
    assert peer.client.goaway is not None and peer.client.goaway.error_code == CALM
    assert peer.tr.closed
    await _next_client_is_served()


async def test_settings_and_ping_floods_get_goaway():
    for frame in (SettingsFrame(0, settings={4: 65535}), PingFrame(0, opaque_data=b"12345678")):
        peer = FakePeer(make_state(limits={"h2_flood_per_second": 50}), echo)
        peer.exchange()
        peer.tr.feed(frame.serialize() * 200)
        await peer.run(2)
        assert peer.client.goaway is not None and peer.client.goaway.error_code == CALM, frame
        assert peer.tr.closed
    await _next_client_is_served()


async def test_a_continuation_flood_is_cut_off():
    peer = FakePeer(make_state(), echo)
    peer.exchange()
    headers = HeadersFrame(1)
    headers.data = b"\x82"  # :method GET, and no END_HEADERS
    peer.tr.feed(headers.serialize())
    cont = ContinuationFrame(1)
    cont.data = b"\x40\x01a\x01b" * 1000  # literal "a: b" fields, over and over
    # zttp's own guard (16 CONTINUATION frames or ~64 KiB of block) answers
    # because zion asks it for events after every read.
    for _ in range(200):
        if peer.tr.closed:
            break
        peer.tr.feed(cont.serialize())
    await peer.run(2)
    assert peer.tr.closed and peer.client.goaway is not None
    assert peer.client.goaway.error_code == CALM
    await _next_client_is_served()


async def test_shutdown_sends_the_two_step_graceful_goaway_and_streams_finish():
    """RFC 9113 6.8: GOAWAY 2^31-1 with a PING; a stream the client sent
    before it read that is still served; the PING's ACK brings the real last
    stream id; the streams in flight finish, then the connection closes."""
    release = []

    async def app(scope, receive, send):
        while not release:
            await settle(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    state = make_state()
    peer = FakePeer(state, app)
    first = peer.client.request()
    await peer.run(3)
    state.draining = True
    peer.proto.shutdown()
    # The h2 client treats GOAWAY as the end of everything: read raw frames.
    step1 = frames(peer.tr.take())
    assert [type(f).__name__ for f in step1] == ["GoAwayFrame", "PingFrame"]
    assert step1[0].last_stream_id == 2**31 - 1 and step1[0].error_code == 0
    # In flight when we sent it: still served.
    late = HeadersFrame(first + 2, flags=["END_HEADERS", "END_STREAM"])
    late.data = b"\x82\x87\x84\x41\x09localhost"  # GET https / localhost
    peer.tr.feed(late.serialize())
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=step1[1].opaque_data).serialize())
    await settle(2)
    [step2] = frames(peer.tr.take())
    assert type(step2).__name__ == "GoAwayFrame" and step2.last_stream_id == first + 2
    assert not peer.tr.closed
    release.append(1)
    await until(lambda: peer.tr.closed)
    rest = frames(peer.tr.take())
    for sid in (first, first + 2):
        answer = [f for f in rest if f.stream_id == sid]
        assert type(answer[0]).__name__ == "HeadersFrame"
        assert b"".join(f.data for f in answer[1:]) == b"done"
        assert "END_STREAM" in answer[-1].flags
    assert state.connections == set()


async def test_an_app_that_does_not_read_holds_its_own_window_and_nobody_elses():
    reading = []

    async def app(scope, receive, send):
        while scope["path"] == "/slow" and not reading:
            await settle(1)
        await echo(scope, receive, send)

    state = make_state(limits={"h2_stream_window": 65535, "h2_connection_window": 262144})
    peer = FakePeer(state, app)
    await peer.run(2)
    assert peer.client.remote_settings[0x4] == 65535
    slow = peer.client.request("POST", "/slow", end=False)
    sent = await peer.push(slow, b"s" * 1_000_000)
    # The slow stream got its window and no more: nothing buffered past it,
    # and the socket is still read...
    assert sent == 65535 and not peer.tr.read_paused
    held = next(iter(peer.proto.streams.values())).exchange
    assert held is not None and held.body_size == 65535
    # ...so the other streams go on, each with many times its window.
    bodies = {peer.client.request("POST", f"/{i}", end=False): bytes([i]) * 300_000
              for i in range(3)}
    for sid, body in bodies.items():
        await peer.upload(sid, body)
    rs = peer.client.responses
    await peer.until(lambda: all(rs[s].ended for s in bodies))
    for sid, body in bodies.items():
        assert bytes(rs[sid].body) == hashlib.sha256(body).hexdigest().encode()
    assert not rs[slow].ended and held.body_size == 65535
    reading.append(1)  # the app reads: its window opens again
    await peer.upload(slow, b"s" * 200_000)
    await peer.until(lambda: rs[slow].ended)
    assert bytes(rs[slow].body) == hashlib.sha256(b"s" * 265535).hexdigest().encode()


async def test_a_window_opened_right_after_the_writer_parks_wakes_it():
    # The app's send() waits for the client's window (drain: wait_for on the
    # stream's Wakeup). The client's WINDOW_UPDATE is read in the same loop
    # iteration, after the app parked and before wait_for's inner Task first
    # ran (as when an app starts inside the read that carries it): the wake
    # came while Wakeup had no Future yet and was lost, and the app waited
    # until send_timeout (httpx's GET of a large body over HTTP/2 hung).
    async def big(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for more in (True, True, False):
            await send({"type": "http.response.body", "body": b"b" * 65536,
                        "more_body": more})

    peer = FakePeer(make_state(limits={"send_timeout": 60.0}), big)
    peer.client.h2.increment_flow_control_window(2**24)  # only the stream's window binds
    await peer.run(2)
    sid = peer.client.request(path="/big")
    r = peer.client.responses[sid]
    peer.exchange()  # the request: the app's Task runs on the next loop turn
    peer.client.h2.increment_flow_control_window(2**24, stream_id=sid)
    update = peer.client.h2.data_to_send()
    # After the app's first step (it parks: 131,073 bytes over a 65,535 window).
    asyncio.get_running_loop().call_soon(peer.tr.feed, update)
    await peer.until(lambda: r.ended, timeout=10)
    assert len(r.body) == 3 * 65536 and r.reset is None


async def _overrun(peer: FakePeer, sizes: list[int]) -> list[int]:
    """Open a stream per size and send that much on it at once, whatever
    the windows say (raw DATA frames the h2 client would refuse to send)."""
    from hyperframe.frame import DataFrame

    await peer.run(2)
    sids = [peer.client.request("POST", end=False) for _ in sizes]
    peer.exchange()
    raw = b""
    for sid, size in zip(sids, sizes, strict=True):
        for off in range(0, size, 16384):
            frame = DataFrame(sid)
            frame.data = b"x" * min(16384, size - off)
            raw += frame.serialize()
    peer.tr.feed(raw)
    await peer.run(2)
    return sids


async def test_a_client_that_sends_past_its_stream_window_is_reset():
    async def never_reads(scope, receive, send):
        await asyncio.sleep(3600)

    peer = FakePeer(make_state(limits={"h2_stream_window": 65535}), never_reads)
    [sid] = await _overrun(peer, [100_000])
    assert peer.client.responses[sid].reset == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert not peer.tr.closed and peer.proto.streams == {}


async def test_a_client_that_sends_past_the_connection_window_gets_goaway():
    async def never_reads(scope, receive, send):
        await asyncio.sleep(3600)

    state = make_state(limits={"h2_stream_window": 65535, "h2_connection_window": 100_000})
    peer = FakePeer(state, never_reads)
    await _overrun(peer, [60_000, 60_000])
    assert peer.client.goaway is not None
    assert peer.client.goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
    assert peer.tr.closed
    await _next_client_is_served()


async def test_an_app_that_fails_gets_500_and_the_connection_serves_on():
    async def app(scope, receive, send):
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        await echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    boom = peer.client.request(path="/boom")
    await peer.until(lambda: peer.client.responses[boom].ended)
    assert peer.client.responses[boom].status == 500
    ok = peer.client.request()
    await peer.until(lambda: peer.client.responses[ok].ended)
    assert peer.client.responses[ok].status == 200


async def _next_client_is_served() -> None:
    peer = FakePeer(make_state(), echo)
    sid = peer.client.request()
    await peer.until(lambda: peer.client.responses[sid].ended)
    assert peer.client.responses[sid].status == 200


async def test_a_long_connection_outlives_zttps_stream_limit_without_a_goaway():
    """Issue 19.3: zttp ends a codec at its 4096th stream; zion hands the
    connection to a fresh codec first, so 8,000 requests on one connection
    all succeed, with no GOAWAY at all."""
    peer = FakePeer(make_state(), echo)
    table = h2.settings.SettingCodes.HEADER_TABLE_SIZE
    # The client's HPACK table stays (h2's encoder indexes what it repeats):
    # each hand-over asks for it to be emptied first, then gives it back.
    assert peer.client.remote_settings.get(table) == 4096
    served = 0
    for _ in range(8000):
        r = peer.client.responses[peer.client.request(path=f"/{served}")]
        await peer.until(lambda r=r: r.ended or peer.client.goaway is not None)
        assert r.status == 200 and peer.client.goaway is None
        served += 1
        peer.client.responses.clear()
    assert served == 8000 and peer.proto.recycled == 2 and not peer.tr.closed
    assert peer.client.remote_settings.get(table) == 4096


async def test_finished_and_reset_streams_leave_no_cycle_for_the_collector():
    """A worker frees each request's objects (stream, exchange, scope, Task)
    as it ends, not at the next cyclic collection."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":  # until the client resets the stream
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        await echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    kept = [peer.client.request() for _ in range(2)]
    await peer.until(lambda: all(peer.client.responses[s].ended for s in kept))
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        done = [peer.client.request() for _ in range(20)]
        held = peer.client.request(path="/hold")
        await peer.until(lambda: all(peer.client.responses[s].ended for s in done))
        await peer.run(2)
        peer.client.h2.reset_stream(held)  # the app's receive() says so; its task ends
        await peer.until(lambda: not peer.proto.streams and not peer.state.tasks)
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert "H2Stream" not in cyclic and "Exchange" not in cyclic, cyclic


async def test_a_client_that_never_acknowledges_the_empty_table_is_not_handed_over():
    """The fresh codec's HPACK table starts empty: without the client's ACK
    of HEADER_TABLE_SIZE 0 its encoder may still refer to entries, so there
    is no hand-over; before zttp's cap the connection ends with the
    graceful GOAWAY, every request sent before it answered."""
    peer = FakePeer(make_state(), echo)
    send = peer.tr.feed

    def without_settings_acks(data: bytes) -> None:
        kept, pos = b"", 0
        while pos + 9 <= len(data):
            end = pos + 9 + int.from_bytes(data[pos:pos + 3], "big")
            if not (data[pos + 3] == 0x4 and data[pos + 4] & 0x1):
                kept += data[pos:end]
            pos = end
        send(kept + data[pos:])

    await peer.run(2)  # the ACK of zttp's own SETTINGS went through
    peer.tr.feed = without_settings_acks  # type: ignore[method-assign]
    answered = 0
    with contextlib.suppress(h2.exceptions.ProtocolError):  # h2 chokes on the PING after it
        while not peer.proto.goaway_sent_at:
            r = peer.client.responses[peer.client.request()]
            await peer.until(lambda r=r: r.ended or peer.proto.goaway_sent_at)
            answered += r.ended and r.status == 200
            peer.client.responses.clear()
    # The graceful GOAWAY's first step (2^31-1 and a PING), no hand-over.
    assert peer.proto.goaway_sent_at and not peer.proto.goaway and peer.proto.recycled == 0
    assert 3000 < answered < 4096 and not peer.tr.closed


async def test_a_hand_over_waits_for_the_old_codecs_streams_then_serves_the_held_ones():
    release = []

    async def app(scope, receive, send):
        while scope["path"] == "/held" and not release:
            await settle(1)
        await echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    held = peer.client.request(path="/held")
    await peer.until_hand_over()
    # Past 3000 streams the old codec finishes its own; a new stream waits.
    assert peer.proto.router is not None
    late = peer.client.responses[peer.client.request()]
    await peer.run(5)
    assert not late.ended and not peer.client.responses[held].ended
    release.append(1)
    await peer.until(lambda: late.ended and peer.client.responses[held].ended)
    assert peer.proto.recycled == 1 and peer.client.goaway is None
    more = [peer.client.request() for _ in range(20)]
    await peer.until(lambda: all(peer.client.responses[s].ended for s in more))
    assert peer.client.goaway is None


async def test_a_hand_over_that_cannot_finish_ends_with_a_graceful_goaway():
    async def app(scope, receive, send):
        while scope["path"] == "/held":
            await settle(1)
        await echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    peer.client.request(path="/held")
    for _ in range(3000):
        r = peer.client.responses[peer.client.request()]
        await peer.until(lambda r=r: r.ended or peer.proto.router is not None)
    assert peer.proto.router is not None
    peer.exchange()
    peer.proto.check_deadline(peer.proto.handover_at + peer.proto.limits.keepalive_timeout)
    step1 = frames(peer.tr.take())
    assert [type(f).__name__ for f in step1] == ["GoAwayFrame", "PingFrame"]
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=step1[1].opaque_data).serialize())
    [step2] = frames(peer.tr.take())
    # The stream held for the fresh codec was never processed: above the last id.
    assert step2.last_stream_id == peer.proto.last_stream < r_sid(peer)


def r_sid(peer: FakePeer) -> int:
    return max(peer.client.responses)


async def test_an_idle_connection_gets_goaway_then_closes():
    state = make_state()
    peer = FakePeer(state, echo)
    sid = peer.client.request()
    await peer.until(lambda: peer.client.responses[sid].ended)
    # keepalive_timeout from the first sweep after the last stream ended
    swept = 1000.0
    peer.proto.check_deadline(swept)
    assert not peer.tr.take() and not peer.tr.closed
    deadline = peer.proto.deadline
    assert deadline == swept + state.limits.keepalive_timeout
    peer.proto.check_deadline(deadline - 0.001)
    assert not peer.tr.closed
    peer.proto.check_deadline(deadline)
    step1 = frames(peer.tr.take())
    assert [type(f).__name__ for f in step1] == ["GoAwayFrame", "PingFrame"]
    assert not peer.tr.closed
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=step1[1].opaque_data).serialize())
    [step2] = frames(peer.tr.take())
    assert step2.last_stream_id == sid and step2.error_code == 0
    await until(lambda: peer.tr.closed)
    assert state.connections == set()


async def test_a_goaway_whose_ping_never_comes_back_ends_after_h2_ping_timeout():
    peer = FakePeer(make_state(), echo)
    peer.proto.shutdown()
    assert len(frames(peer.tr.take())) == 2
    peer.proto.check_deadline(peer.proto.goaway_sent_at + peer.proto.limits.h2_ping_timeout)
    [step2] = frames(peer.tr.take())
    assert type(step2).__name__ == "GoAwayFrame" and step2.last_stream_id == 0
    await until(lambda: peer.tr.closed)


async def test_forwarded_headers_and_root_path_apply_as_over_http1():
    async def app(scope, receive, send):
        text = f"{scope['client'][0]} {scope['scheme']} {scope['root_path']}"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": text.encode()})

    # The fake peer is 127.0.0.1: trusted by the default forwarded_allow_ips.
    peer = FakePeer(make_state(server={"root_path": "/api"}), app)
    sid = peer.client.request(headers=[("x-forwarded-for", "10.1.2.3"),
                                       ("x-forwarded-proto", "http")])
    await peer.until(lambda: peer.client.responses[sid].ended)
    assert peer.client.responses[sid].body == b"10.1.2.3 http /api"


async def test_expect_100_continue_gets_an_interim_100():
    peer = FakePeer(make_state(), echo)
    sid = peer.client.request("POST", headers=[("expect", "100-continue")], body=b"abc")
    await peer.until(lambda: peer.client.responses[sid].ended)
    assert peer.client.responses[sid].informational == [100]
    assert peer.client.responses[sid].status == 200


async def test_the_tls_extension_is_in_the_scope_when_client_certs_are_asked_for():
    from zion.http.h2 import H2Protocol

    seen = {}

    async def app(scope, receive, send):
        seen.update(scope["extensions"])
        await echo(scope, receive, send)

    state = make_state(tls={"cert_reqs": "optional"})
    state.dispatch = lambda ex: ex.run(app, state.tasks)
    proto = H2Protocol(state)
    tr = FakeTransport(proto)
    tr.extra["ssl_object"] = SimpleNamespace(getpeercert=lambda binary_form=False: None,
                                             version=lambda: "TLSv1.3")
    proto.connection_made(tr)  # type: ignore[arg-type]
    client = Client()
    sid = client.request()
    tr.feed(client.h2.data_to_send())
    await until(lambda: client.receive(tr.take()) is not None and client.responses[sid].ended)
    assert seen["tls"]["tls_version"] == 0x0304 and seen["tls"]["client_cert_chain"] == []
    assert "http.response.trailers" in seen


async def test_many_resets_over_a_long_connection_do_not_end_it():
    # zttp 0.0.35 calls a codec's 257th reset a flood, however slowly they
    # came (browsers cancel streams as pages change): zion hands over to a
    # fresh codec first, and the connection goes on.
    peer = FakePeer(make_state(limits={"h2_flood_per_second": 1000}), echo)
    for _ in range(600):
        sid = peer.client.request(end=False)
        peer.exchange()
        peer.client.h2.reset_stream(sid)
        await peer.run(1)
    assert peer.client.goaway is None and peer.proto.recycled >= 2
    ok = peer.client.request()
    await peer.until(lambda: peer.client.responses[ok].ended)
    assert peer.client.responses[ok].status == 200


async def test_a_silent_connection_with_streams_open_is_pinged_then_closed():
    async def hang(scope, receive, send):
        await asyncio.sleep(3600)

    state = make_state(limits={"h2_ping_interval": 10.0, "h2_ping_timeout": 5.0})
    peer = FakePeer(state, hang)
    peer.client.request()
    await peer.run(2)
    proto = peer.proto
    t0 = 1000.0
    proto.check_deadline(t0)  # the tick that sees the client's last bytes
    proto.check_deadline(t0 + 9.9)
    assert frames(peer.tr.take()) == []
    proto.check_deadline(t0 + 10)
    [ping] = frames(peer.tr.take())
    assert type(ping).__name__ == "PingFrame" and "ACK" not in ping.flags
    proto.check_deadline(t0 + 14.9)
    assert not peer.tr.closed
    peer.client.receive(ping.serialize())  # the client answers: all is well
    peer.exchange()
    proto.check_deadline(t0 + 15)
    assert not peer.tr.closed and proto.ping_deadline == 0.0
    proto.check_deadline(t0 + 24.9)
    assert frames(peer.tr.take()) == []
    # A client that never answers:
    proto.check_deadline(t0 + 25)
    assert frames(peer.tr.take())
    proto.check_deadline(t0 + 29.9)
    assert not peer.tr.closed
    proto.check_deadline(t0 + 30)
    assert peer.tr.closed
    await _next_client_is_served()


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.2), as a browser sends it."""
    from websockets.frames import Frame, Opcode

    return Frame(Opcode(opcode), payload).serialize(mask=True, extensions=None)


def _ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while len(data) >= 2:
        length = data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        out.append((data[0] & 0x0F, data[start:start + length]))
        data = data[start + length:]
    return out


async def test_a_websocket_over_an_http2_stream_rfc_8441():
    seen = {}

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            seen.update(scope)
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept", "subprotocol": "chat"})
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") == "bye":
                    await send({"type": "websocket.close", "code": 1000})
                    continue
                await send({"type": "websocket.send", "text": "echo:" + msg["text"]})
        else:
            await echo(scope, receive, send)

    peer = FakePeer(make_state(websocket={"per_message_deflate": False}), app)
    await peer.run(2)
    assert peer.client.remote_settings[0x8] == 1  # SETTINGS_ENABLE_CONNECT_PROTOCOL
    ws = peer.client.request("CONNECT", "/chat?room=1", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", "chat, other")])
    plain = peer.client.request()  # an ordinary request beside it
    rs = peer.client.responses
    await peer.until(lambda: rs[ws].status and rs[plain].ended)
    assert rs[ws].status == 200 and not rs[ws].ended
    assert rs[ws].header(b"sec-websocket-protocol") == b"chat"
    names = {n for n, _ in rs[ws].headers}
    assert not names & {b"upgrade", b"connection", b"sec-websocket-accept"}
    assert seen["http_version"] == "2" and seen["scheme"] == "wss"
    assert seen["path"] == "/chat" and seen["query_string"] == b"room=1"
    assert seen["subprotocols"] == ["chat", "other"]
    for text in ("one", "two"):
        peer.client.h2.send_data(ws, _ws_frame(1, text.encode()))
    await peer.until(lambda: len(_ws_frames(bytes(rs[ws].body))) == 2)
    assert _ws_frames(bytes(rs[ws].body)) == [(1, b"echo:one"), (1, b"echo:two")]
    peer.client.h2.send_data(ws, _ws_frame(1, b"bye"))
    await peer.until(lambda: _ws_frames(bytes(rs[ws].body))[-1][0] == 8)  # the app's close
    peer.client.h2.send_data(ws, _ws_frame(8, b"\x03\xe8"), end_stream=True)  # and ours
    await peer.until(lambda: rs[ws].ended)  # then END_STREAM
    assert peer.proto.streams == {} and not peer.tr.closed
    await peer.until(lambda: "type" in seen and len(peer.state.tasks) == 0)


async def test_an_extended_connect_refused_by_the_app_gets_its_status():
    async def app(scope, receive, send):
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"www-authenticate", b"Bearer")]})
        await send({"type": "websocket.http.response.body", "body": b"who are you"})

    peer = FakePeer(make_state(), app)
    await peer.run(2)
    sid = peer.client.request("CONNECT", "/ws", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13")])
    r = peer.client.responses[sid]
    await peer.until(lambda: r.ended or r.reset is not None)
    assert r.status == 401 and bytes(r.body) == b"who are you"
    assert r.header(b"www-authenticate") == b"Bearer"


async def test_a_websocket_app_that_does_not_receive_holds_its_stream_window():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(3600)  # never receives

    state = make_state(websocket={"max_queue": 2, "per_message_deflate": False},
                       limits={"h2_stream_window": 65535})
    peer = FakePeer(state, app)
    await peer.run(2)
    ws = peer.client.request("CONNECT", "/ws", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13")])
    await peer.until(lambda: peer.client.responses[ws].status == 200)
    messages = b"".join(_ws_frame(2, b"m" * 10_000) for _ in range(100))
    sent = await peer.push(ws, messages)
    # Reading paused at 2 queued messages: the client had its window, no more.
    assert 20_000 < sent <= 65535 + 16384 and not peer.tr.read_paused
    plain = peer.client.request()  # the connection serves on
    await peer.until(lambda: peer.client.responses[plain].ended)


async def test_a_stream_opened_after_our_final_goaway_is_ignored_not_reset():
    release = []

    async def app(scope, receive, send):
        while not release:
            await settle(1)
        await echo(scope, receive, send)

    peer = FakePeer(make_state(), app)
    held = peer.client.request()
    await peer.run(2)
    peer.proto.shutdown()
    step1 = frames(peer.tr.take())
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=step1[1].opaque_data).serialize())
    [goaway] = frames(peer.tr.take())
    assert type(goaway).__name__ == "GoAwayFrame" and goaway.last_stream_id == held
    # The client sent this before it read the final GOAWAY: it is above the
    # last stream id, so the client sends it again elsewhere (RFC 9113 6.8); a
    # reset on top makes curl 7.88 fail some such requests.
    late = HeadersFrame(held + 2, flags=["END_HEADERS", "END_STREAM"])
    late.data = b"\x82\x87\x84\x41\x09localhost"  # GET https / localhost
    peer.tr.feed(late.serialize())
    await settle(2)
    assert frames(peer.tr.take()) == [] and peer.proto.resets == 1
    release.append(1)
    await until(lambda: peer.tr.closed)  # once the held stream is answered
    answer = frames(peer.tr.take())
    assert {f.stream_id for f in answer} == {held}


async def test_drain_gives_an_http2_websocket_its_time_then_a_1001_close():
    from zion.http.websocket import WebSocketProtocol

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    peer = FakePeer(make_state(websocket={"per_message_deflate": False}), app)
    await peer.run(2)
    ws = peer.client.request("CONNECT", "/ws", end=False, headers=[
        (":protocol", "websocket"), ("sec-websocket-version", "13")])
    await peer.until(lambda: peer.client.responses[ws].status == 200)
    peer.state.draining = True
    for conn in list(peer.state.connections):
        conn.shutdown()  # drain begins: GOAWAY, the WebSocket keeps going
    step1 = frames(peer.tr.take())  # GOAWAY 2^31-1 and a PING (RFC 9113 6.8)
    peer.tr.feed(PingFrame(0, flags=["ACK"], opaque_data=step1[-1].opaque_data).serialize())
    await settle(3)
    assert not peer.tr.closed and ws in peer.proto.streams
    [sock] = [c for c in peer.state.connections if isinstance(c, WebSocketProtocol)]
    sock.close()  # drain timeout: 1001, then the stream and the connection end
    await until(lambda: peer.tr.closed)
    # The h2 client stops at a GOAWAY: the frames, raw.
    sent = frames(peer.tr.take())
    assert type(sent[0]).__name__ == "GoAwayFrame" and sent[0].last_stream_id == ws
    body = b"".join(f.data for f in sent if type(f).__name__ == "DataFrame")
    assert _ws_frames(body)[-1] == (8, b"\x03\xe9server shutting down")
    assert any("END_STREAM" in f.flags for f in sent if f.stream_id == ws)


async def test_a_path_without_a_leading_slash_gets_400_as_over_http1():
    peer = FakePeer(make_state(), echo)
    bad = peer.client.request(path="abc")
    star = peer.client.request("OPTIONS", "*")
    good = peer.client.request(path="/abc")
    await peer.until(lambda: all(peer.client.responses[s].ended for s in (bad, star, good)))
    assert peer.client.responses[bad].status == 400
    assert peer.client.responses[star].status == 200
    assert peer.client.responses[good].status == 200


async def test_a_stream_that_depends_on_itself_is_reset_protocol_error():
    """RFC 9113 5.3.1, in a HEADERS frame's priority and in a PRIORITY frame."""
    from hyperframe.frame import PriorityFrame

    peer = FakePeer(make_state(), echo)
    peer.exchange()
    block = b"\x82\x87\x84\x01\x09localhost"  # GET https / localhost
    selfish = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=1)
    selfish.data = block
    fine = HeadersFrame(3, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=1)
    fine.data = block
    opened = HeadersFrame(5, flags=["END_HEADERS"])
    opened.data = block
    peer.tr.feed(selfish.serialize() + fine.serialize() + opened.serialize())
    peer.tr.feed(PriorityFrame(5, depends_on=5).serialize())
    await settle(3)
    sent = frames(peer.tr.take())
    resets = {f.stream_id: f.error_code for f in sent if type(f).__name__ == "RstStreamFrame"}
    assert resets == {1: 1, 5: 1}  # PROTOCOL_ERROR
    assert any(type(f).__name__ == "HeadersFrame" and f.stream_id == 3 for f in sent)


async def test_a_self_dependent_stream_alone_in_its_read_is_reset_too():
    """The read of one whole frame skips the scan unless it is a PRIORITY
    frame or HEADERS with the PRIORITY flag: each alone in a read."""
    from hyperframe.frame import PriorityFrame

    peer = FakePeer(make_state(), echo)
    peer.exchange()
    block = b"\x82\x87\x84\x01\x09localhost"  # GET https / localhost
    selfish = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=1)
    selfish.data = block
    peer.tr.feed(selfish.serialize())
    await settle(3)
    opened = HeadersFrame(3, flags=["END_HEADERS"])
    opened.data = block
    peer.tr.feed(opened.serialize())
    peer.tr.feed(PriorityFrame(3, depends_on=3).serialize())
    await settle(3)
    sent = frames(peer.tr.take())
    resets = {f.stream_id: f.error_code for f in sent if type(f).__name__ == "RstStreamFrame"}
    assert resets == {1: 1, 3: 1}  # PROTOCOL_ERROR


async def read_body_noting_a_disconnect(receive: Any, seen: list[str]) -> None:
    """The app side of the over-the-limit tests: read the body to its end,
    or note the http.disconnect that cuts it short."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            seen.append("disconnect")
            return
        if not msg.get("more_body"):
            return


async def test_an_http2_body_over_the_limit_ends_the_apps_task_with_a_disconnect():
    seen: list[str] = []

    async def app(scope, receive, send):
        await read_body_noting_a_disconnect(receive, seen)

    state = make_state(limits={"max_body_size": 1000})
    peer = FakePeer(state, app)
    declared = peer.client.request("POST", "/", headers=[("content-length", "5000")], end=False)
    open_ended = peer.client.request("POST", "/", end=False)
    await peer.run(3)
    assert peer.client.responses[declared].status == 413  # before any of the body
    await peer.push(open_ended, b"x" * 3000)
    await peer.until(lambda: peer.client.responses[open_ended].status == 413)
    await until(lambda: seen == ["disconnect"] and state.slot.inflight == 0)


async def test_a_body_over_the_limit_after_the_app_began_answering_resets_the_stream():
    """Too late for a 413 (the head is out): the stream is reset with CANCEL,
    the app's next receive() is http.disconnect, and nothing stays in flight."""
    seen: list[str] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started", "more_body": True})
        await read_body_noting_a_disconnect(receive, seen)

    state = make_state(limits={"max_body_size": 1000})
    peer = FakePeer(state, app)
    sid = peer.client.request("POST", "/", end=False)
    await peer.run(3)
    assert peer.client.responses[sid].status == 200
    await peer.push(sid, b"x" * 3000)
    await peer.until(lambda: peer.client.responses[sid].reset is not None)
    assert peer.client.responses[sid].reset == h2.errors.ErrorCodes.CANCEL
    await until(lambda: seen == ["disconnect"] and state.slot.inflight == 0)


async def answered(peer: FakePeer, path: str = "/") -> tuple[int, list[Any]]:
    """One request; the frames of its answer as zion wrote them (until the
    one with END_STREAM), then given to the client."""
    sid = peer.client.request(path=path)
    peer.tr.feed(peer.client.h2.data_to_send())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not any(f.stream_id == sid and "END_STREAM" in f.flags
                  for f in frames(bytes(peer.tr.buffer))):
        assert loop.time() < deadline, "no END_STREAM"
        await settle(1)
    data = peer.tr.take()
    peer.client.receive(data)
    return sid, [f for f in frames(data) if f.stream_id == sid]


async def test_a_response_ends_on_its_last_data_frame_and_repeated_fields_are_indexed():
    """Frames as sent: HEADERS, then DATA carrying END_STREAM (no empty DATA
    frame after it); a head repeated on the connection is a few one-byte
    indices (RFC 7541 6.1) that the client decodes to the same fields."""
    async def app(scope, receive, send):
        path = scope["path"]
        status = 204 if path == "/empty" else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        if path == "/stream":
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await send({"type": "http.response.body", "body": b"" if status == 204 else b"hello"})

    peer = FakePeer(make_state(), app)
    peer.exchange()
    sent = {}
    for path in ("/", "/", "/", "/stream", "/empty"):
        sid, answer = await answered(peer, path)
        sent[sid] = [(type(f).__name__, sorted(f.flags), getattr(f, "data", None))
                     for f in answer]
    rs = peer.client.responses
    assert all(r.ended and r.header(b"content-type") == b"text/plain" and r.header(b"server")
               for r in rs.values())
    assert [bytes(rs[s].body) for s in sent] == [b"hello"] * 3 + [b"parthello", b""]
    first, second, third, stream, empty = sent.values()
    for one in (first, second, third):
        assert [(kind, flags) for kind, flags, _ in one] == [
            ("HeadersFrame", ["END_HEADERS"]), ("DataFrame", ["END_STREAM"])]
    assert len(third[0][2]) == 5  # :status 200 and four indexed fields
    assert [(kind, flags) for kind, flags, _ in stream] == [
        ("HeadersFrame", ["END_HEADERS"]), ("DataFrame", []), ("DataFrame", ["END_STREAM"])]
    assert stream[2][2] == b"hello"
    assert [(kind, flags) for kind, flags, _ in empty] == [
        ("HeadersFrame", ["END_HEADERS", "END_STREAM"])]


async def test_a_smaller_header_table_from_the_client_is_honoured_at_once():
    """RFC 7541 4.2: after the client's SETTINGS_HEADER_TABLE_SIZE 0 the next
    head opens with a size update to 0 and refers to no dynamic entry."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    peer = FakePeer(make_state(), app)
    peer.exchange()
    for _ in range(3):
        await answered(peer)
    peer.client.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    peer.exchange()
    await settle(3)
    peer.exchange()  # our ACK: the client's decoder may now shrink
    sid, answer = await answered(peer)
    head = answer[0]
    assert type(head).__name__ == "HeadersFrame"
    assert head.data[:1] == b"\x20" and not any(b >= 0x80 + 62 for b in head.data[1:])
    r = peer.client.responses[sid]
    assert r.ended and r.status == 200 and r.header(b"content-type") == b"text/plain"
    assert peer.proto.encoder.max_size == 0 and not peer.proto.encoder.table


async def test_one_streams_cancelled_writer_leaves_the_others_waiting_for_the_write_buffer():
    # The connection's write buffer is full: every stream's send() waits in
    # the connection's drain. One stream's Task is cancelled there (its
    # --timeout-request, an anyio cancel scope of the framework's): the
    # others must go on waiting, not be cancelled with it.
    tasks: dict[str, asyncio.Task[Any]] = {}

    async def app(scope, receive, send):
        tasks[scope["path"]] = asyncio.current_task()  # type: ignore[assignment]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
        await send({"type": "http.response.body", "body": b"y"})

    peer = FakePeer(make_state(), app)
    await peer.run(2)
    peer.proto.pause_writing()  # as the transport does past its high-water mark
    first = peer.client.request(path="/a")
    second = peer.client.request(path="/b")
    peer.exchange()
    await until(lambda: len(tasks) == 2)
    await settle(10)
    assert not any(task.done() for task in tasks.values())  # both wait in drain
    tasks["/a"].cancel()
    await settle(10)
    assert tasks["/a"].cancelled() and not tasks["/b"].done()
    peer.proto.resume_writing()
    r = peer.client.responses[second]
    await peer.until(lambda: r.ended, timeout=5)
    assert r.body == b"x" * 1000 + b"y" and r.reset is None
    assert not tasks["/b"].cancelled()
    assert first in peer.client.responses
