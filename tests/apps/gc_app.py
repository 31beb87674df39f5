"""Reports what the worker's cyclic garbage collector sees."""

import gc


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"frozen={gc.get_freeze_count()} tracked={len(gc.get_objects())}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
