"""WebSocket through a real `zion serve`: TLS, the transport switch, the
demux's connection count, and drain (SIGTERM -> the drain timeout -> 1001)."""

from __future__ import annotations

import signal

import websockets

from tests.conftest import client_context, get, wait_for


async def test_wss_echo_counts_as_a_connection_and_drain_closes_with_1001(start_zion):
    srv = start_zion("ws_raw_app:app", env={"ZION_SUPERVISOR_DRAIN_TIMEOUT": "1"}, workers=1)
    url = f"wss://127.0.0.1:{srv.port}/ws"
    async with websockets.connect(url, ssl=client_context(alpn=False),
                                  server_hostname="localhost") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x01" * 1_000_000)
        assert await ws.recv() == b"\x01" * 1_000_000
        status = (await get(srv.port, "/_zion/status")).json()
        # the status request's own connection plus the open WebSocket
        assert status["connections"] == 2
        srv.signal(signal.SIGTERM)
        try:
            await ws.recv()
            raise AssertionError("the server must close the WebSocket")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert srv.proc.wait(15) == 0
    wait_for(lambda: "ws_app_disconnect code=1001" in srv.log_text(), what="app saw 1001")
