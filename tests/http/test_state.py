"""ServerState's load accounting, which the demux reads."""

from __future__ import annotations

from tests.support.fake_transport import make_state


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
