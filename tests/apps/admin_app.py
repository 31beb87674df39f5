"""The app behind the load-balancer and admin tests: who am I, who are you,
and answers with a chosen status or after a chosen delay."""

import asyncio
import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    status = 200
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
    elif path == "/slow":
        await asyncio.sleep(float(scope["query_string"] or b"1"))
    body = json.dumps({"client": scope["client"], "server": scope["server"],
                       "pid": os.getpid()}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
