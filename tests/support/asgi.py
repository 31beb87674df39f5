"""Pieces of the ASGI apps the tests serve."""

from __future__ import annotations

from typing import Any


async def read_body(receive: Any) -> bytes:
    """The whole request body: every http.request message until one says no
    more (or the client is gone: http.disconnect has no more_body either)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
