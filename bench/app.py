"""The benchmark app, identical for every server: a raw ASGI callable (no
framework), GET / -> 200 "Hello, world!" with content-type and content-length,
lifespan handled, and a WebSocket echo on any path. `app_pid` adds an x-pid
header for the distribution runs; `app_mixed` holds its worker for 200 ms on
/heavy (a blocking handler)."""

import os
import time

BODY = b"Hello, world!"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _ws_echo(receive, send):
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message.get("text"),
                    "bytes": message.get("bytes")})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] == "websocket":
        return await _ws_echo(receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


PID_HEADERS = [*HEADERS, (b"x-pid", str(os.getpid()).encode())]


async def app_pid(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    headers = [*HEADERS, (b"x-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def app_mixed(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["path"] == "/heavy":
        time.sleep(0.2)  # a handler that holds its worker, as CPU-bound code does
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


# The files scenario: GET /file/<name> from bench/.work/files, by pathsend where
# the server advertises it (zion, granian), else in 256 KiB body messages.
FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work", "files")


async def app_files(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    path = os.path.join(FILES, os.path.basename(scope["path"]))
    if not scope["path"].startswith("/file/") or not os.path.isfile(path):
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    size = os.path.getsize(path)
    pathsend = "http.response.pathsend" in scope.get("extensions", {})
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(size).encode()), (b"x-pathsend", b"yes" if pathsend else b"no")]})
    if pathsend:
        await send({"type": "http.response.pathsend", "path": path})
        return
    with open(path, "rb") as f:
        while chunk := f.read(262144):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
