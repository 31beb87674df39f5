"""ServerState's load accounting, which the demux reads."""

from __future__ import annotations

from tests.support.fake_transport import make_state


async def test_a_connection_taken_wakes_the_heartbeat_and_counts_as_a_handshake():
    # The heartbeat slows down while a worker has no work in hand; a
    # connection accepted (its TLS handshake starts) must put it back to its
    # busy pace at once, or the program would take the worker's old
    # heartbeat for a blocked loop.
    state = make_state()
    woken = []
    state.became_busy = lambda: woken.append(state.slot.handshakes)
    state.connection_accepted()
    state.connection_accepted()
    assert woken == [1, 2]
    assert state.slot.handshakes == 2 and state.slot.conns == 2
    state.handshake_ended()
    state.handshake_ended()
    assert state.slot.handshakes == 0 and state.slot.conns == 0
    assert state.slot.accepted == 2
