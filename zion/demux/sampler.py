"""The accept-queue sampler: each listener's real queue, for the program.

The program adds one to a slot's `backlog` per connection it dispatches
there; every `interval` the master overwrites that guess with the kernel's
own count (TCP_INFO's tcpi_unacked on a listener is sk_ack_backlog). Only
the master can see a frozen worker's queue grow (the worker is frozen), and
a real sample also undoes guesses for clients that left before their
handshake, so the load figure never drifts.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from zion.demux.board import StatusBoard
from zion.listeners import accept_queue_len

INTERVAL = 0.01  # seconds


class QueueSampler:
    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0

    def maybe_sample(self, now: float, sockets: Sequence[socket.socket],
                     board: StatusBoard) -> None:
        if now < self.next_at:
            return
        self.next_at = now + self.interval
        sample(sockets, board)


def sample(sockets: Sequence[socket.socket], board: StatusBoard) -> None:
    slots = board.slots
    for index, sock in enumerate(sockets):
        slots[index].backlog = accept_queue_len(sock)
