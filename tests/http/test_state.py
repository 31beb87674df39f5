"""ServerState's load accounting, which the demux reads."""

from __future__ import annotations

from tests.support.fake_transport import make_state


async def test_an_idle_worker_taking_a_connection_wakes_its_heartbeat_once():
    # The heartbeat slows down while a worker has nothing to do; the first
    # connection must put it back to its busy pace at once, or the program
    # would take the worker's old heartbeat for a blocked loop.
    state = make_state()
    woken = []
    state.became_busy = lambda: woken.append(state.slot.conns)
    state.connection_accepted()
    state.connection_accepted()
    assert woken == [1], "once, when the first connection counts as load"
    state.handshake_ended()
    state.handshake_ended()
    assert state.slot.conns == 0
    state.connection_accepted()
    assert woken == [1, 1]
    assert state.slot.accepted == 3
