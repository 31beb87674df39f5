"""The signal queue: handlers only enqueue and wake the loop; tests inject."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator

import pytest

from zion.supervisor.signals import HANDLED, SignalQueue


@pytest.fixture
def queue() -> Iterator[SignalQueue]:
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    q = SignalQueue()
    yield q
    signal.set_wakeup_fd(-1)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    for fd in q.fds:
        os.close(fd)


def _awake(q: SignalQueue) -> bool:
    return bool(select.select([q.wake_r], [], [], 5)[0])


def test_a_delivered_signal_is_queued_and_wakes_the_loop(queue):
    queue.install()
    os.kill(os.getpid(), signal.SIGHUP)  # the real kernel path: handler, then wake-up fd
    assert _awake(queue)
    assert queue.pop() is signal.SIGHUP and queue.pop() is None
    queue.drain_wakeups()
    assert not select.select([queue.wake_r], [], [], 0)[0]


def test_tests_inject_a_signal_by_pushing_it(queue):
    queue.push(signal.SIGTERM)
    queue.push(signal.SIGCHLD)
    assert _awake(queue)
    assert [queue.pop(), queue.pop(), queue.pop()] == [signal.SIGTERM, signal.SIGCHLD, None]
