"""A bare ASGI app for the HTTP/2 server tests: echoes checksums, streams
large bodies, waits on request, sends trailers."""

import asyncio
import hashlib

from lifespan_accept import accept_lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    path = scope["path"]
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        body = message.get("body", b"")
        digest.update(body)
        size += len(body)
        if not message.get("more_body"):
            break
    if path == "/big":
        total = int(scope["query_string"] or b"1048576")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(total).encode())]})
        chunk = bytes(range(256)) * 256
        sent = 0
        while sent < total:
            part = chunk[: total - sent]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < total})
        return
    if path == "/slow":
        await asyncio.sleep(float(scope["query_string"] or b"1"))
    if path == "/trailers":
        await send({"type": "http.response.start", "status": 200, "headers": [],
                    "trailers": True})
        await send({"type": "http.response.body", "body": b"body"})
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"42")]})
        return
    text = f"{scope['http_version']} {scope['method']} {size} {digest.hexdigest()}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})
