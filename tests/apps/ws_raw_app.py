"""Raw ASGI: a WebSocket echo at /ws that also reports its disconnect code
to stdout (the test reads the server log), and a plain HTTP route."""

import sys

from lifespan_accept import accept_lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"http"})
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            print(f"ws_app_disconnect code={msg['code']}", file=sys.stderr, flush=True)
            return
        await send({"type": "websocket.send", "text": msg.get("text"), "bytes": msg.get("bytes")})
