"""Bare ASGI callables exercising the protocol edges."""

import os

from lifespan_accept import accept_lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    path = scope["path"]
    if path == "/disconnect":
        # Read the body until the client goes away; record what we saw.
        seen = []
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                break
        with open(os.environ["ZION_TEST_EVENTS"], "a") as fh:
            fh.write(" ".join(seen) + "\n")
        return
    if path == "/big":
        size = int(scope["query_string"] or b"1048576")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(size).encode())]})
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            part = chunk[: size - sent]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < size})
        return
    if path == "/no-response":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-type", b"text/plain"), (b"x-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"got %d bytes" % len(body)})


async def no_lifespan(scope, receive, send):
    assert scope["type"] == "http", "lifespan not supported"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
