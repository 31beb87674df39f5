"""A FastAPI app the way people write them: `def` endpoints, a sync
dependency, middleware, FileResponse, BackgroundTasks, SSE, streams,
an outgoing httpx call, its own /healthz, and a WebSocket."""

import asyncio
import os
import pathlib
import threading
import time

import httpx
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse

DATA = pathlib.Path(os.environ.get("ZION_TEST_DATA", "/nonexistent"))

app = FastAPI()


def sync_dependency() -> dict:
    return {"dependency": "sync", "dep_thread": threading.current_thread().name}


@app.middleware("http")
async def stamp(request: Request, call_next):
    response = await call_next(request)
    response.headers["x-middleware"] = "yes"
    return response


@app.get("/def")
def def_endpoint(dep: dict = Depends(sync_dependency)) -> dict:  # noqa: B008 (FastAPI idiom)
    in_thread = threading.current_thread() is not threading.main_thread()
    return {"ok": True, **dep, "in_thread": in_thread}


@app.post("/def-json")
def def_json(payload: dict) -> dict:
    return {"echo": payload}


@app.get("/file")
def big_file() -> FileResponse:
    return FileResponse(DATA / "big.bin")


def write_marker(tag: str) -> None:
    time.sleep(0.05)
    (DATA / f"bg-{tag}").write_text("done")


@app.get("/background")
def background(tag: str, tasks: BackgroundTasks) -> dict:
    tasks.add_task(write_marker, tag)
    return {"queued": tag}


@app.get("/structured")
async def structured() -> dict:
    async with asyncio.timeout(5):
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(asyncio.sleep(0.01, "a"))
            b = tg.create_task(asyncio.sleep(0.01, "b"))
    return {"results": [a.result(), b.result()]}


@app.get("/sse")
async def sse() -> EventSourceResponse:
    async def events():
        for i in range(3):
            yield {"data": str(i)}
            await asyncio.sleep(0.3)

    return EventSourceResponse(events())


@app.get("/endless")
def endless(tag: str) -> StreamingResponse:
    def chunks():  # a sync generator that never checks for a disconnect
        n = 0
        while True:
            n += 1
            (DATA / f"endless-{tag}").write_text(str(n))
            yield b"x" * 1024
            time.sleep(0.02)

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@app.get("/outgoing")
async def outgoing(request: Request) -> dict:
    async with httpx.AsyncClient(verify=False) as client:
        inner = await client.get(str(request.base_url) + "def")
    return {"inner": inner.json()}


@app.get("/healthz")
def own_healthz() -> PlainTextResponse:
    return PlainTextResponse("the app's own healthz")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "close please":
                await websocket.close(code=4000, reason="as you wish")
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        pass
