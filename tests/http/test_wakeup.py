"""zion/http/wakeup.py: one wake() for every waiter, each on a Future of its own."""

from __future__ import annotations

import asyncio

from tests.support.fake_transport import settle
from zion.http.wakeup import Wakeup


async def test_a_cancelled_waiter_leaves_the_others_waiting_and_wake_sets_them_all():
    wakeup = Wakeup(asyncio.get_running_loop())
    waiters = [asyncio.ensure_future(wakeup.wait()) for _ in range(3)]
    await settle(2)
    waiters[0].cancel()
    await settle(2)
    assert waiters[0].cancelled() and not waiters[1].done() and not waiters[2].done()
    wakeup.wake()
    await asyncio.wait_for(asyncio.gather(waiters[1], waiters[2]), 1)


async def test_waiters_a_timeout_ended_do_not_pile_up():
    wakeup = Wakeup(asyncio.get_running_loop())
    for _ in range(100):
        future = wakeup.wait()
        future.cancel()  # what wait_for does at its timeout
    assert wakeup._waiters is not None and len(wakeup._waiters) <= 16
    live = wakeup.wait()
    wakeup.wake()
    assert live.done() and wakeup._waiters is None
