"""A real Starlette app for the tests: routes, streaming, lifespan, request bodies."""

import asyncio
import contextlib
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

EVENTS_FILE = os.environ.get("ZION_TEST_EVENTS", "")


def _record(what: str) -> None:
    if EVENTS_FILE:
        with open(EVENTS_FILE, "a") as fh:
            fh.write(f"{what} {os.getpid()}\n")


@contextlib.asynccontextmanager
async def lifespan(app):
    _record("startup")
    yield {"greeting": "hello from lifespan"}
    _record("shutdown")


async def hello(request: Request):
    return PlainTextResponse("Hello, world!", headers={"x-pid": str(os.getpid())})


async def echo(request: Request):
    body = await request.body()
    return JSONResponse({"length": len(body), "sha": __import__("hashlib").sha256(body).hexdigest(),
                         "method": request.method, "query": str(request.query_params)})


async def state(request: Request):
    return JSONResponse({"greeting": request.state.greeting})


async def stream(request: Request):
    async def chunks():
        for i in range(5):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/plain")


async def slow(request: Request):
    delay = float(request.query_params.get("s", "1"))
    await asyncio.sleep(delay)
    return PlainTextResponse(f"slept {delay}", headers={"x-pid": str(os.getpid())})


async def block(request: Request):
    import time
    time.sleep(float(request.query_params.get("s", "0.2")))  # holds the worker, on purpose
    return PlainTextResponse("blocked", headers={"x-pid": str(os.getpid())})


async def boom(request: Request):
    raise RuntimeError("boom")


app = Starlette(lifespan=lifespan, routes=[
    Route("/", hello), Route("/echo", echo, methods=["POST", "PUT"]), Route("/state", state),
    Route("/stream", stream), Route("/slow", slow), Route("/block", block), Route("/boom", boom),
])
