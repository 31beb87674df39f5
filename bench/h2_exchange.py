"""zion's own cost per small request, in-process: bytes in through the
protocol, the Exchange and a trivial ASGI app in its Task, bytes out - over
HTTP/1.1 (H1Protocol, keep-alive) and HTTP/2 (H2Protocol, one connection,
streams one after another and 16 at a time). No sockets, no TLS.

Run it against another checkout (PYTHONPATH=/tmp/head) to see what a change
costs the HTTP/1.1 path.

    .venv/bin/python bench/h2_exchange.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

N = 3000


class _Transport:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.out = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8443)}.get(name)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello, world"})


def _state() -> Any:
    from zion.http.state import ServerState
    from zion.settings import load_settings

    class Slot:
        conns = 0
        inflight = 0

    loop = asyncio.get_running_loop()
    state = ServerState(load_settings(None, {}, {}), 0, loop, Slot())
    state.dispatch = lambda ex: ex.run(_app, state.tasks)
    # As the worker's loop (zion.worker.WorkerLoop.attach) sets it.
    state.plain_tasks = loop.get_task_factory() is None
    return state


async def _drive(proto: Any, reads: Any, busy: Any) -> None:
    """Each read fed from a loop callback, as a transport's read is (outside
    any Task, so task_start may run a request's first step inside it), the
    next once busy() says the previous request is answered: one callback and
    at least one loop turn per request, whichever way its Task starts."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    feed = iter(reads)

    def step() -> None:
        if not busy():
            data = next(feed, None)
            if data is None:
                done.set_result(None)
                return
            proto.data_received(data)
        loop.call_soon(step)

    loop.call_soon(step)
    await done


async def _h1() -> float:
    from zion.http.h1 import H1Protocol

    proto = H1Protocol(_state())
    tr = _Transport(proto)
    proto.connection_made(tr)  # type: ignore[arg-type]
    req = b"GET /api/items?page=2 HTTP/1.1\r\nhost: localhost\r\nuser-agent: bench\r\n\r\n"
    t0 = time.perf_counter()
    await _drive(proto, [req] * N, lambda: proto.current is not None)
    return (time.perf_counter() - t0) / N * 1e6


def client_frames(n: int, batch: int) -> tuple[bytes, list[bytes]]:
    """What an HTTP/2 client sends for `n` GETs, `batch` per read: its
    preface, then one read's bytes per batch (pure-Python `h2`, far dearer
    than the server: bench/h2_instructions.py makes them outside callgrind)."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.increment_flow_control_window(2**30)
    preface = client.data_to_send()
    headers = [(":method", "GET"), (":path", "/api/items?page=2"), (":scheme", "https"),
               (":authority", "localhost"), ("user-agent", "bench")]
    frames = []
    for i in range(n // batch):
        for j in range(batch):
            client.send_headers(1 + 2 * (i * batch + j), headers, end_stream=True)
        frames.append(client.data_to_send())
    return preface, frames


async def _h2(batch: int, made: tuple[bytes, list[bytes]] | None = None) -> float:
    from zion.http.h2 import H2Protocol

    state = _state()
    proto = H2Protocol(state)
    tr = _Transport(proto)
    proto.connection_made(tr)  # type: ignore[arg-type]
    preface, frames = made or client_frames(N, batch)
    proto.data_received(preface)
    t0 = time.perf_counter()
    await _drive(proto, frames, lambda: proto.streams)
    elapsed = time.perf_counter() - t0
    assert state.requests_total == (N // batch) * batch, state.requests_total
    return elapsed / ((N // batch) * batch) * 1e6


async def main() -> None:
    import uvloop  # noqa: F401  (zion's workers run on it; measured on asyncio here)

    rows: dict[str, list[float]] = {"HTTP/1.1": [], "HTTP/2, 1 stream at a time": [],
                                    "HTTP/2, 16 streams per read": []}
    for _ in range(5):
        rows["HTTP/1.1"].append(await _h1())
        try:
            rows["HTTP/2, 1 stream at a time"].append(await _h2(1))
            rows["HTTP/2, 16 streams per read"].append(await _h2(16))
        except ImportError:
            pass
    print(f"| path | µs/request (median of 5 x {N}) |")
    print("|---|---|")
    for name, values in rows.items():
        if values:
            print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
