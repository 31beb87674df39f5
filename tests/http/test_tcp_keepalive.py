"""server.tcp_keepalive: TCP keepalive on the connections a real `zion serve`
accepts (zion/worker.py sets it on the listener; accepted sockets inherit
it), seen from the kernel's /proc/net/tcp."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import close, connect, wait_for

_KEEPALIVE_TIMER = 2  # /proc/net/tcp "tr": 1 retransmit, 2 keepalive, 4 zero window


def _timer(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """The (timer, clock ticks left) of the server's end of one IPv4
    connection, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, timer = fields[1], fields[2], fields[5]
            if (int(local.split(":")[1], 16) == local_port
                    and int(remote.split(":")[1], 16) == remote_port):
                kind, left = timer.split(":")
                return int(kind, 16), int(left, 16)
    return None


async def test_an_accepted_connection_has_tcp_keepalive(start_zion: Any) -> None:
    """Issue: a peer that vanished without a FIN (power, NAT, cable) held its
    connection for ever while zion had nothing to send it: a WebSocket whose
    app neither sends nor receives defers its pong deadline. The kernel's
    keepalive timer now runs on an accepted connection that is silent."""
    srv = start_zion("--no-bpf-demux", workers=1, env={"ZION_SERVER_TCP_KEEPALIVE": "30"})
    _reader, writer = await connect(srv.port)
    try:
        client_port = writer.get_extra_info("sockname")[1]
        # Once the handshake's last ACK is out, the idle connection's timer is
        # keepalive, due within the 30 s asked (USER_HZ clock ticks, 100/s).
        timer = await asyncio.to_thread(
            wait_for, lambda: (t := _timer(srv.port, client_port)) and t[0] == _KEEPALIVE_TIMER
            and t, 10, "the keepalive timer on the server's end")
        assert 0 < timer[1] <= 30 * 100
    finally:
        await close(writer)


async def test_tcp_keepalive_zero_turns_it_off(start_zion: Any) -> None:
    srv = start_zion("--no-bpf-demux", workers=1, env={"ZION_SERVER_TCP_KEEPALIVE": "0"})
    _reader, writer = await connect(srv.port)
    try:
        client_port = writer.get_extra_info("sockname")[1]
        timer = await asyncio.to_thread(
            wait_for, lambda: _timer(srv.port, client_port), 10, "the server's end")
        assert timer[0] != _KEEPALIVE_TIMER
    finally:
        await close(writer)
