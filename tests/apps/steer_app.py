"""For the steering tests: every answer names its worker (x-pid); /hold?x
blocks its worker's loop (a synchronous handler, as CPU-bound code does)
until the file named by $STEER_HOLD followed by x is gone, so a test decides when a busy
worker is free again without sleeping."""

import os
import time

from lifespan_accept import accept_lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    headers = [(b"content-type", b"text/plain"), (b"x-pid", str(os.getpid()).encode())]
    if scope["path"] == "/hold":
        # /hold?x waits for $STEER_HOLD + "x" to go, so holds end one by one.
        flag = os.environ["STEER_HOLD"] + scope["query_string"].decode()
        while os.path.exists(flag):
            time.sleep(0.005)
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})
