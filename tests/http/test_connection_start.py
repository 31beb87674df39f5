"""ConnectionStart over a fake transport: the protocol is picked before a
byte of HTTP is read (h2c prior knowledge here; ALPN in test_h2.py)."""

from __future__ import annotations

from tests.support.fake_transport import FakeTransport, make_state
from zion.http.connection_start import ConnectionStart
from zion.http.h1 import H1Protocol
from zion.http.h2 import H2Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _start(state):
    state.h2c = True  # a no-TLS listener with HTTP/2 on
    start = ConnectionStart(state)
    tr = FakeTransport(start)
    start.connection_made(tr)  # type: ignore[arg-type]
    return tr


async def test_the_preface_split_over_reads_picks_http2_counted_once():
    state = make_state()
    tr = _start(state)
    tr.feed(PREFACE[:5])
    tr.feed(PREFACE[5:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # + empty SETTINGS
    assert isinstance(tr.protocol, H2Protocol) and state.connections == {tr.protocol}
    assert state.counters.connections == 1 and tr.take()[3] == 0x4  # our SETTINGS


async def test_other_first_bytes_go_to_http11_and_a_silent_client_is_closed():
    state = make_state()
    tr = _start(state)
    tr.feed(b"GET /_zion/healthz HTTP/1.1\r\n")
    assert isinstance(tr.protocol, H1Protocol) and state.connections == {tr.protocol}
    silent = _start(state)
    assert len(state.connections) == 2
    silent.protocol.check_deadline(state.loop.time() + state.limits.header_timeout)
    assert silent.closed and len(state.connections) == 1


async def test_upgrade_h2c_answers_101_and_our_settings_come_first():
    state = make_state(limits={"h2_max_streams": 7})
    tr = _start(state)
    tr.feed(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
            b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
    assert isinstance(tr.protocol, H2Protocol) and state.counters.connections == 1
    assert tr.take().startswith(b"HTTP/1.1 101 ")
    tr.feed(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    out = tr.take()
    length = int.from_bytes(out[:3], "big")
    pairs = {int.from_bytes(out[i:i + 2], "big"): int.from_bytes(out[i + 2:i + 6], "big")
             for i in range(9, 9 + length, 6)}
    # SETTINGS, ours: our stream limit, zttp's HPACK table kept (h2.py docstring)
    assert out[3] == 0x4 and pairs[0x3] == 7 and pairs[0x1] == 4096
