"""Litestar: sync handlers run in a thread, and a `Stream` response."""

import asyncio
import threading

from litestar import Litestar, get
from litestar.response import Stream


@get("/sync", sync_to_thread=True)
def sync_handler() -> dict:
    return {"main_thread": threading.current_thread() is threading.main_thread()}


@get("/stream")
async def stream() -> Stream:
    async def chunks():
        for i in range(3):
            yield f"part {i}\n"
            await asyncio.sleep(0)

    return Stream(chunks())


app = Litestar([sync_handler, stream])
