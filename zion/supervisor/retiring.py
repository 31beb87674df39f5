"""Listeners a reload no longer uses, kept until their accept queue is empty.

After a shrinking reload the new program sends a retired listener nothing
more, but connections the kernel already queued on it are still there: its
worker keeps accepting until TCP_INFO reports an empty queue (or the drain
timeout passes), and only then is it stopped and the socket closed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from zion.listeners import accept_queue_len
from zion.supervisor.pool import WorkerHandle


@dataclass
class RetiringListener:
    handle: WorkerHandle
    sock: socket.socket
    deadline: float
    signalled: bool = False


class Retiring:
    def __init__(self, queue_len: Callable[[socket.socket], int] = accept_queue_len) -> None:
        self.items: list[RetiringListener] = []
        self.queue_len = queue_len

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, handle: WorkerHandle, sock: socket.socket, deadline: float) -> None:
        self.items.append(RetiringListener(handle, sock, deadline))

    def holds(self, handle: WorkerHandle) -> bool:
        return any(r.handle is handle for r in self.items)

    def sockets(self) -> list[socket.socket]:
        return [r.sock for r in self.items]

    def to_stop(self, routed: bool, now: float) -> list[WorkerHandle]:
        """Workers whose retired listener is empty (or out of time): stop them.
        Without the program nothing keeps the kernel hash from queueing on the
        listener, so its queue may never empty: stop them at once then."""
        out = []
        for r in self.items:
            if not r.signalled and (not routed or self.queue_len(r.sock) == 0
                                    or now > r.deadline):
                r.signalled = True
                out.append(r.handle)
        return out

    def collect(self, alive: Callable[[int], bool]) -> list[RetiringListener]:
        """Close and forget the listeners whose worker has exited."""
        done = [r for r in self.items if not alive(r.handle.pid)]
        for r in done:
            r.sock.close()
            self.items.remove(r)
        return done

    def close_all(self) -> None:
        for r in self.items:
            r.sock.close()
        self.items.clear()
