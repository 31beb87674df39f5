"""An app that misbehaves on purpose, for the supervisor's limits: it blocks
its event loop, leaks memory, never answers, or holds requests open."""

import asyncio
import os
import time
from urllib.parse import parse_qs

from lifespan_accept import accept_lifespan

LEAKED: list[bytes] = []


def _arg(scope, name, default):
    values = parse_qs(scope["query_string"].decode()).get(name)
    return float(values[0]) if values else default


def _note(line):
    path = os.environ.get("ZION_TEST_EVENTS")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def sleep_in_async_def(seconds):
    # The mistake this app exists for: a synchronous sleep on the event loop.
    time.sleep(seconds)


async def _held():
    # Until the test creates $ZION_TEST_RELEASE (60 s at most): in flight
    # for as long as the test needs, whatever the machine's load.
    release = os.environ["ZION_TEST_RELEASE"]
    for _ in range(3000):
        if os.path.exists(release):
            return
        await asyncio.sleep(0.02)


async def answer(send, status=200, body=b"ok"):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"x-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _slow_second_boot():
    # With $ZION_TEST_SLOW_BOOT (a directory): the first worker boots at once,
    # every later one (a replacement) waits in lifespan startup, before it
    # listens, until the test creates `release` there (30 s at most).
    where = os.environ.get("ZION_TEST_SLOW_BOOT")
    if not where:
        return
    booted = os.path.join(where, "booted")
    if not os.path.exists(booted):
        open(booted, "w").close()
        return
    for _ in range(1500):
        if os.path.exists(os.path.join(where, "release")):
            return
        await asyncio.sleep(0.02)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await _slow_second_boot()
        await accept_lifespan(receive, send)
        return
    path = scope["path"]
    if path == "/block":
        sleep_in_async_def(_arg(scope, "s", 60))
    elif path == "/leak":
        # 4 MiB per request (or ?mib=N), touched so that it is resident;
        # with ?then=M, M MiB more once $ZION_TEST_RELEASE exists.
        LEAKED.append(b"\x01" * (int(_arg(scope, "mib", 4)) << 20))
        if then := int(_arg(scope, "then", 0)):
            await _held()
            LEAKED.append(b"\x01" * (then << 20))
    elif path == "/forever":
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            _note(f"cancelled {scope['http_version']}")
            raise
    elif path == "/head-then-wait":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            _note("cancelled after head")
            raise
    elif path == "/trailers-then-wait":
        # HTTP/2: head and body out, the stream open for trailers that never come.
        await send({"type": "http.response.start", "status": 200, "headers": [],
                    "trailers": True})
        await send({"type": "http.response.body", "body": b"part"})
        await asyncio.Event().wait()
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(int(_arg(scope, "n", 4))):
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(_arg(scope, "every", 0.5))
        await send({"type": "http.response.body", "body": b"done\n"})
        return
    elif path == "/slow":
        await asyncio.sleep(_arg(scope, "s", 1))
    elif path == "/hold":
        await _held()
    elif path == "/answer-then-hold":
        # The response first, then work in the same task, as a framework's
        # background task does (Starlette's BackgroundTasks).
        await answer(send)
        await _held()
        return
    await answer(send)
