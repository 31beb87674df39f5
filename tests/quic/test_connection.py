"""zion/quic/connection.py: aioquic's server connection with zion's CIDs,
derived reset tokens and server-bounded receive windows, driven in memory
by aioquic's client (no sockets: what is checked is what the server puts
in its packets)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated

from zion.quic import cid
from zion.quic.connection import ServerConnection, reset_token
from zion.quic.tls import configuration
from zion.settings import load_settings

CLIENT, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 443)
KEY = b"k" * 32
WINDOW = 65536  # limits.h3_stream_window
CONNECTION_WINDOW = 100_000  # limits.h3_connection_window
IDLE = 7.0  # limits.h3_idle_timeout
STREAMS = 7


def _pair(tmp_path, slot: int = 3, generation: int = 5) -> tuple[QuicConnection, ServerConnection]:
    settings = load_settings(cli={"tls": {"state_dir": str(tmp_path)}, "limits": {
        "h3_stream_window": WINDOW, "h3_connection_window": CONNECTION_WINDOW,
        "h3_idle_timeout": IDLE}})
    client_config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    client_config.verify_mode = ssl.CERT_NONE
    client = QuicConnection(configuration=client_config)
    client.connect(SERVER, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    server = ServerConnection(configuration=configuration(settings),
                              new_cid=cid.factory(slot, generation), reset_key=KEY,
                              max_streams=STREAMS,
                              original_destination_connection_id=_dcid(first[0][0]))
    for data, _ in first:
        server.receive_datagram(data, CLIENT, now=0.0)
    _exchange(client, server)
    # The spare CIDs (NEW_CONNECTION_ID) go out with the first 1-RTT packets.
    client.send_ping(1)
    _exchange(client, server, 0.01)
    return client, server


def _dcid(initial: bytes) -> bytes:
    length = initial[5]
    return initial[6:6 + length]


def _exchange(client: QuicConnection, server: QuicConnection, now: float = 0.0) -> None:
    for step in range(200):
        now += 0.001 * step  # past the client's pacing
        moved = False
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER, now=now)
            moved = True
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT, now=now)
            moved = True
        if not moved:
            return


def test_every_server_cid_names_the_slot_and_generation(tmp_path):
    client, _server = _pair(tmp_path)
    # The client's view: the CID it addresses now, and the spares the
    # server gave it with NEW_CONNECTION_ID (for migration).
    seen = [client._peer_cid, *client._peer_cid_available]
    assert len(seen) >= 2, "the server issued no spare CIDs"
    for peer in seen:
        assert cid.parse(peer.cid) == cid.ServerCid(slot=3, generation=5)
        assert peer.stateless_reset_token == reset_token(KEY, peer.cid)
    assert len({p.cid for p in seen}) == len(seen)


def test_the_client_gets_the_h3_windows_and_idle_timeout(tmp_path):
    client, _server = _pair(tmp_path)
    # The server's transport parameters, as the client read them.
    assert client._remote_max_stream_data_bidi_remote == WINDOW
    assert client._remote_max_data == CONNECTION_WINDOW
    assert client._remote_max_idle_timeout == IDLE


def test_a_silent_connection_is_gone_after_the_idle_timeout(tmp_path):
    client, server = _pair(tmp_path)
    client.send_ping(2)
    _exchange(client, server, 100.0)  # the last packets, within 100.1 s
    server.handle_timer(100.1 + IDLE - 1.0)
    assert server._close_event is None, "closed before limits.h3_idle_timeout"
    server.handle_timer(100.1 + IDLE + 1.0)
    closed = [e for e in iter(server.next_event, None) if isinstance(e, ConnectionTerminated)]
    assert closed, "still open past limits.h3_idle_timeout"


def test_the_connection_window_slides_and_holds(tmp_path):
    client, server = _pair(tmp_path)
    limit = server._local_max_data
    assert limit.value == CONNECTION_WINDOW
    # Three streams of a stream window each, nothing held: twice the first
    # connection window (STREAMS = 7 caps the streams this test may open).
    for _ in range(3):
        sid = client.get_next_available_stream_id()
        client.send_stream_data(sid, b"x" * WINDOW, end_stream=True)
    now = _until(client, server, 1.0, lambda: limit.used == 3 * WINDOW)
    assert limit.used == 3 * WINDOW
    # Slid to what arrived plus our window (in steps of half a window);
    # aioquic alone doubles it, to 4x the first here.
    assert limit.used < limit.value <= limit.used + CONNECTION_WINDOW
    # A stream held (its app has not read): its own window stays, the
    # connection's slides on, so the other streams go on (it stayed too, and
    # one app that did not read stalled the whole connection).
    held = client.get_next_available_stream_id()
    client.send_stream_data(held, b"x" * 1000, end_stream=False)
    now = _until(client, server, now, lambda: limit.used == 3 * WINDOW + 1000)
    assert limit.used == 3 * WINDOW + 1000
    server.held_streams.add(held)
    frozen = server._streams[held].max_stream_data_local
    for _ in range(3):  # more than the rest of the connection window
        sid = client.get_next_available_stream_id()
        client.send_stream_data(sid, b"x" * WINDOW, end_stream=True)
    client.send_stream_data(held, b"x" * 2 * WINDOW, end_stream=False)  # past its window
    now = _until(client, server, now, lambda: limit.used == 6 * WINDOW + frozen)
    now = _until(client, server, now, lambda: False, rounds=20)
    assert limit.used == 6 * WINDOW + frozen  # the others all, the held one to its window
    assert limit.used < limit.value <= limit.used + CONNECTION_WINDOW
    assert server._streams[held].max_stream_data_local == frozen
    server.held_streams.discard(held)
    _until(client, server, now, lambda: limit.used == 8 * WINDOW + 1000)
    assert limit.used == 8 * WINDOW + 1000  # the rest of it, once it moved


def _until(client: QuicConnection, server: QuicConnection, now: float,
           done: Callable[[], bool], rounds: int = 300) -> float:
    """Datagrams both ways, the clock moving on (pacing, timers), until
    `done()` or for `rounds`; returns the clock. The caller asserts."""
    for _ in range(rounds):
        if done():
            return now
        _exchange(client, server, now)
        now += 0.02
        for peer in (client, server):
            timer = peer.get_timer()
            if timer is not None and timer <= now:
                peer.handle_timer(now)
    return now


def test_a_stream_window_does_not_move_while_held(tmp_path):
    client, server = _pair(tmp_path)
    window = server._local_max_stream_data_bidi_remote  # limits.h3_stream_window
    assert window == WINDOW
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * 1000, end_stream=False)
    _exchange(client, server, 1.0)
    server.held_streams.add(sid)  # the app has not read
    client.send_stream_data(sid, b"x" * (4 * window), end_stream=False)
    _exchange(client, server, 2.0)
    stream = server._streams[sid]
    assert stream.receiver.highest_offset == window  # stopped at the first window
    assert stream.max_stream_data_local == window
    server.held_streams.discard(sid)  # read: the window slides past what came
    _exchange(client, server, 3.0)
    assert stream.receiver.highest_offset > window
    # Slid to what arrived plus our window (in steps of half a window), never doubled.
    assert stream.max_stream_data_local <= stream.receiver.highest_offset + WINDOW


def test_requests_open_at_once_are_max_streams(tmp_path):
    client, server = _pair(tmp_path)
    # The client's initial MAX_STREAMS (bidirectional) is limits.h3_max_streams.
    assert client._remote_max_streams_bidi == STREAMS
    sids = []
    for _ in range(STREAMS):
        sids.append(sid := client.get_next_available_stream_id())
        client.send_stream_data(sid, b"request", end_stream=True)
    _exchange(client, server, 1.0)
    for sid in sids:
        server.send_stream_data(sid, b"answer", end_stream=True)
    _exchange(client, server, 2.0)
    # Streams that ended give their places to new ones, no more.
    assert client._remote_max_streams_bidi == 2 * STREAMS
