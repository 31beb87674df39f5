"""zion/quic/endpoint.py on a real server: a worker that replaces a dead one
on its UDP socket answers the dead worker's connections with a stateless
reset (RFC 9000 10.3) carrying the token the client was given, which it can
only derive because every worker shares the master's reset key."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.support.h3client import h3_connect
from tests.support.serve import serve


async def test_a_dead_workers_connection_gets_a_stateless_reset(start_zion):
    srv = serve(start_zion, "h3_app:app", "--http3", workers=1)
    async with h3_connect(srv.port) as client:
        first = await asyncio.wait_for(client.request("/"), 20)
        assert first.status == 200
        token = client.reset_token
        os.kill(int(first.headers[b"x-pid"]), signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40  # under the per-test timeout
        # The respawn reads the same socket (the master holds it): what was
        # sent meanwhile waits there for it.
        while not any(d.endswith(token) for d in client.datagrams):
            assert loop.time() < deadline, "no stateless reset came back"
            client.send_request("/again")
            await asyncio.sleep(0.2)
    reset = next(d for d in client.datagrams if d.endswith(token))
    assert reset[0] & 0xC0 == 0x40  # looks like a short-header packet
    assert 21 <= len(reset) <= 43
