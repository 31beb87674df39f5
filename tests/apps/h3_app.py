"""A bare ASGI app for the HTTP/3 tests: answers with the protocol, the
size and digest of the body it read, and the worker's pid (x-pid), so a
test sees which worker served each request (/pid also in its body, for a
browser's page to show). /hold?FILE answers (200 KB) once
FILE exists; /big?N sends N bytes; /extensions names the scope's
extensions; /pathsend answers with this file by http.response.pathsend;
/early answers before it reads the body."""

import asyncio
import hashlib
import os

from lifespan_accept import accept_lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    pid = str(os.getpid()).encode()
    if scope["path"] == "/early":  # answers before it reads the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"early ", "more_body": True})
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        body = message.get("body", b"")
        digest.update(body)
        size += len(body)
        if not message.get("more_body"):
            break
    if scope["path"] == "/early":
        await send({"type": "http.response.body", "body": b"read %d" % size})
        return
    if scope["path"] == "/hold":
        # Answers once the file named by the query string exists.
        release = scope["query_string"].decode()
        while not os.path.exists(release):
            await asyncio.sleep(0.02)
    if scope["path"] == "/big":
        total = int(scope["query_string"] or b"1048576")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(total).encode()), (b"x-pid", pid)]})
        chunk = bytes(range(256)) * 256
        sent = 0
        while sent < total:
            part = chunk[: total - sent]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < total})
        return
    if scope["path"] == "/pathsend":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-pid", pid)]})
        await send({"type": "http.response.pathsend", "path": os.path.abspath(__file__)})
        return
    text = f"{scope['http_version']} {scope['method']} {size} {digest.hexdigest()}"
    if scope["path"] == "/extensions":
        text = " ".join(sorted(scope.get("extensions") or {}))
    if scope["path"] == "/pid":
        text = f"{scope['http_version']} {os.getpid()}"
    if scope["path"] == "/hold":
        text += " " * 200_000  # enough datagrams (and acknowledgements) to notice a reset
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"x-pid", pid)]})
    await send({"type": "http.response.body", "body": text.encode()})
