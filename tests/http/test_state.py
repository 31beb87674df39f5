"""ServerState's load accounting, which the demux reads."""

from __future__ import annotations

from tests.support.fake_transport import FakeTransport, make_state
from zion.http.connection_start import ConnectionStart
from zion.http.h1 import H1Protocol


async def test_work_arriving_at_the_idle_pace_wakes_the_heartbeat():
    # The heartbeat slows down while a worker has no work in hand; a
    # connection accepted (its TLS handshake starts) must put it back to its
    # busy pace at once, or the program would take the worker's old
    # heartbeat for a blocked loop. At the busy pace, nothing is called.
    state = make_state()
    woken = []

    def wake() -> None:
        woken.append(state.slot.handshakes)
        state.heartbeat_slow = False

    state.became_busy = wake
    state.heartbeat_slow = True
    state.connection_accepted()
    state.connection_accepted()
    assert woken == [1]
    assert state.slot.handshakes == 2 and state.slot.conns == 2
    state.handshake_ended()
    state.handshake_ended()
    assert state.slot.handshakes == 0 and state.slot.conns == 0
    assert state.slot.accepted == 2


async def test_a_handshake_that_ends_in_an_open_connection_is_counted_once_throughout():
    # Accepted: one handshake, counted in conns. Its handshake ends and the
    # protocol ConnectionStart picked opens it in the same callback: the
    # board then shows no handshake and one connection (connection_opened
    # publishes both counts, handshake_ended(opening=True) leaves them to it).
    # A second accepted connection still in its handshake stays counted.
    state = make_state()
    start = ConnectionStart(state, accepted=True)
    state.connection_accepted()  # another one, still in its handshake
    assert (state.slot.handshakes, state.slot.conns) == (2, 2)
    tr = FakeTransport(start)
    start.connection_made(tr)  # type: ignore[arg-type]
    assert isinstance(tr.protocol, H1Protocol) and state.connections == {tr.protocol}
    assert (state.slot.handshakes, state.slot.conns) == (1, 2)
    state.handshake_ended()  # the other one failed
    assert (state.slot.handshakes, state.slot.conns) == (0, 1)
    tr.protocol.close()
    assert (state.slot.handshakes, state.slot.conns) == (0, 0)
    assert state.slot.accepted == 2 and state.counters.connections == 1
