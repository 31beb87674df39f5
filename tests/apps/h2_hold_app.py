"""Apps that hold what the client sends them, for HTTP/2 flow-control tests
(several streams on one connection, some whose apps do not read).

WebSocket /deaf   accepts, then never receives until GET /release; then ends.
WebSocket /echo   echoes every message.
WebSocket /late   receives nothing until GET /release; then counts the
                  messages until a text "done", and sends the count back.
HTTP /hold        never reads its request body until GET /release; then 200.
HTTP /release     releases the held apps of this worker.
HTTP anything     reads the whole body, answers its length.
"""

import asyncio

from lifespan_accept import accept_lifespan

released = asyncio.Event()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        if scope["path"] == "/deaf":
            await released.wait()
            return
        if scope["path"] == "/late":
            await released.wait()
            count = 0
            while (await receive()).get("text") != "done":
                count += 1
            await send({"type": "websocket.send", "text": str(count)})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": msg.get("text"),
                        "bytes": msg.get("bytes")})
    if scope["path"] == "/release":
        released.set()
    elif scope["path"] == "/hold":
        await released.wait()
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})
