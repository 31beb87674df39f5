"""WebSocket apps that never call receive() after accepting, for the attacks
of issue 19 (deflate queue, ping flood, a client that never reads).

/ws     sends "tick" every 50 ms and ends when send() raises (the client left:
        an OSError, ASGI spec 2.4); never receives.
/flood  sends 64 KB messages as fast as send() returns; prints
        "ws_send_failed <exception>" to stderr when it raises, and ends.
HTTP /gc?off|on   turns the worker's cyclic collector off or on.
HTTP /buffers     the write buffer size of each open WebSocket's transport.
HTTP /alive       counts the WebSocket objects still in memory (gc.get_objects
                  sees what the collector tracks, reachable or not, without
                  collecting anything); /alive?Name,Other counts those types.
"""

import asyncio
import gc
import sys

from lifespan_accept import accept_lifespan


def _alive(query: bytes = b"") -> str:
    names = tuple(query.decode().split(",")) if query else (
        "WebSocketProtocol", "_ServerProtocol", "ServerProtocol")
    counts = dict.fromkeys(names, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    return " ".join(f"{k}={v}" for k, v in counts.items())


def _write_buffers() -> str:
    """Bytes each open WebSocket's transport holds for its client."""
    sizes = []
    for obj in gc.get_objects():
        if type(obj).__name__ == "WebSocketProtocol" and obj.transport is not None:
            sizes.append(obj.transport.get_write_buffer_size())
    return " ".join(map(str, sizes))


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    if scope["type"] == "http":
        if scope["path"] == "/gc":
            if scope["query_string"] == b"off":
                gc.disable()
            else:
                gc.enable()
            body = f"gc_enabled={gc.isenabled()}"
        elif scope["path"] == "/buffers":
            body = _write_buffers()
        else:
            body = _alive(scope["query_string"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})
        return
    await receive()
    await send({"type": "websocket.accept"})
    try:
        while True:
            if scope["path"] == "/flood":
                await send({"type": "websocket.send", "bytes": b"x" * 65536})
            else:
                await asyncio.sleep(0.05)
                await send({"type": "websocket.send", "text": "tick"})
    except OSError as exc:
        print(f"ws_send_failed {exc!r}", file=sys.stderr, flush=True)
