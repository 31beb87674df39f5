"""The worker's count of request body its apps have not read
(ServerState.unread_body), as its /_zion/status gives it: for the tests of
limits.unread_body_per_worker over HTTP/2 and HTTP/3 (one worker)."""

from __future__ import annotations

import asyncio

from tests.conftest import get


async def unread_body(port: int) -> int:
    return int((await get(port, "/_zion/status")).json()["unread_body_bytes"])


async def unread_body_becomes(port: int, value: int, timeout: float = 10.0) -> None:
    """Poll until the worker counts `value`: it brings its count down at its
    tick (twice a second) or as streams and connections go."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (count := await unread_body(port)) != value:
        if loop.time() > deadline:
            raise AssertionError(f"the worker counts {count} bytes unread, not {value}")
        await asyncio.sleep(0.05)
