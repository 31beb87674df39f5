"""An in-process transport for protocol edge cases: bytes in, bytes out, no
sockets and no TLS. Real servers cover what only they show; framing and
limit cases run here in milliseconds (uvicorn's MockTransport is the model)."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

from zion.http.state import ServerState
from zion.settings import load_settings


class FakeTransport:
    def __init__(self, protocol: asyncio.Protocol | None = None) -> None:
        self.protocol = protocol
        self.buffer = bytearray()
        self.closed = False
        self.aborted = False
        self.read_paused = False
        self.extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8443)}
        self.high_water = 0

    # -- what a protocol calls --
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high or 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.buffer += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.Protocol | None:
        return self.protocol

    # -- what a test calls --
    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def feed(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.data_received(data)


class FakeSlot:
    conns = 0
    inflight = 0
    handshakes = 0
    accepted = 0


def make_state(**sections: dict[str, Any]) -> ServerState:
    """A worker's ServerState over the embedded default settings, with
    overrides per section: make_state(limits={"max_body_size": 10})."""
    real = load_settings(None, {}, {})
    settings = SimpleNamespace(**{f.name: getattr(real, f.name)
                                  for f in dataclasses.fields(real)})
    for section, values in sections.items():
        current = getattr(settings, section, None)
        if current is None:
            current = SimpleNamespace(**values)
        else:
            current = dataclasses.replace(current, **values)
        setattr(settings, section, current)
    return ServerState(settings, 0, asyncio.get_running_loop(), FakeSlot())  # type: ignore[arg-type]


def connect(state: ServerState, app: Any = None) -> FakeTransport:
    """An H1 connection over a fake transport, dispatching to `app` the way
    the worker's handler chain does (built-ins and static files aside)."""
    from zion.http.h1 import H1Protocol
    from zion.http.websocket import WebSocketProtocol, request_bytes

    if app is not None:
        state.dispatch = lambda ex: ex.run(app, state.tasks)

        def ws_factory(scope: dict[str, Any], target: bytes,
                       headers: list[tuple[bytes, bytes]], trailing: bytes) -> asyncio.Protocol:
            return WebSocketProtocol(state, app, scope, request_bytes(target, headers) + trailing)

        state.websocket_factory = ws_factory
    proto = H1Protocol(state)
    transport = FakeTransport(proto)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return transport


async def settle(rounds: int = 5) -> None:
    """Let callbacks and tasks started by fed bytes run (no wall-clock wait)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll `predicate` with a deadline (for work that leaves the loop, like
    a thread pool); fails the test if it never holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.001)
