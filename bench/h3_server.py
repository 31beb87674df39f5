"""HTTP/3 against HTTP/2 on one real zion worker: server CPU per request.

Starts `zion serve app:app --workers 1 --http3` (bench/app.py), then sends
the same small GETs over HTTP/2 (h2load, C) and over HTTP/3 (aioquic's
client: pure Python, so the client is slow and the wall-clock rate says
little; the worker's CPU per request, read from /proc, is the figure).

    .venv/bin/python bench/h3_server.py [--requests N] [--connections C] [--streams S]

Needs h2load (Debian's nghttp2-client) and aioquic. Short by design: a
couple of thousand requests each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Client(QuicConnectionProtocol):
    # True: the requests a connection's streams issue in one loop iteration
    # leave in one transmission (as h2load writes its -m streams' requests
    # together, and browsers coalesce); False: one transmission per request.
    coalesce = False
    # Datagrams received by every client connection (the server's flights):
    # a server that sends each stream's answer alone costs the client more too.
    datagrams = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.waiting: dict[int, asyncio.Future[int]] = {}
        self.status: dict[int, int] = {}
        self.flush_due = False

    def datagram_received(self, data: bytes | str, addr: object) -> None:
        _Client.datagrams += 1
        super().datagram_received(data, addr)  # type: ignore[arg-type]

    def _flush(self) -> None:
        self.flush_due = False
        self.transmit()

    def quic_event_received(self, event: object) -> None:
        for h3_event in self.h3.handle_event(event):  # type: ignore[arg-type]
            if isinstance(h3_event, HeadersReceived):
                self.status[h3_event.stream_id] = int(dict(h3_event.headers)[b":status"])
            if isinstance(h3_event, HeadersReceived | DataReceived) and h3_event.stream_ended:
                future = self.waiting.pop(h3_event.stream_id, None)
                if future is not None:
                    future.set_result(self.status.pop(h3_event.stream_id, 0))

    async def get(self) -> int:
        sid = self._quic.get_next_available_stream_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[sid] = future
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", b"localhost"), (b":path", b"/")],
                             end_stream=True)
        if not self.coalesce:
            self.transmit()
        elif not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future


async def _h3(port: int, requests: int, connections: int, streams: int) -> int:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_NONE
    per_connection = requests // connections
    ok = 0

    async def one() -> None:
        nonlocal ok
        async with connect("127.0.0.1", port, configuration=config,
                           create_protocol=_Client) as client:
            assert isinstance(client, _Client)
            left = per_connection

            async def stream() -> None:
                nonlocal left, ok
                while left > 0:
                    left -= 1
                    status = await client.get()  # not `ok += await`: ok is read before
                    ok += status == 200

            await asyncio.gather(*(stream() for _ in range(streams)))

    await asyncio.gather(*(one() for _ in range(connections)))
    return ok


async def h3_for(port: int, seconds: float, connections: int, streams: int) -> dict[str, float]:
    """GETs of / from `connections` x `streams` for `seconds` (bench/scenarios.py's
    http3 scenario, any server). `failed`: requests sent and not answered 200,
    including those still unanswered 30 s after the end; `errors`: connections
    that raised (refused, closed by the server, a failed handshake)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_NONE
    sent = ok = 0
    datagrams = _Client.datagrams
    start = time.perf_counter()
    until = start + seconds

    async def one() -> None:
        nonlocal sent, ok
        async with connect("127.0.0.1", port, configuration=config,
                           create_protocol=_Client) as client:
            assert isinstance(client, _Client)

            async def stream() -> None:
                nonlocal sent, ok
                while time.perf_counter() < until:
                    sent += 1
                    status = await client.get()
                    ok += status == 200

            await asyncio.gather(*(stream() for _ in range(streams)))

    runs = asyncio.gather(*(one() for _ in range(connections)), return_exceptions=True)
    try:
        outcomes = await asyncio.wait_for(runs, seconds + 30)
    except TimeoutError:
        outcomes = []
    wall = time.perf_counter() - start
    errors = sum(isinstance(o, BaseException) for o in outcomes) if outcomes else connections
    return {"sent": sent, "requests": ok, "failed": sent - ok, "errors": errors,
            "seconds": wall, "rps": ok / wall,
            "datagrams_per_req": (_Client.datagrams - datagrams) / max(ok, 1)}


def start_zion(port: int, env: dict[str, str], wrapper: tuple[str, ...] = (),
               extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], int]:
    """`zion serve` of bench/app.py, one worker, --http3, its log as JSON lines,
    run under `wrapper` (valgrind, for h3_instructions.py): the process and its
    worker's pid, once the worker is ready. The caller stops the process."""
    server = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "zion", "serve", "app:app", "--port", str(port),
         "--workers", "1", "--http3", *extra, "--log-format", "json"], cwd=BENCH, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        for line in server.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "workers_ready":
                return server, int(event["pids"][0])
        raise AssertionError("zion did not start")
    except BaseException:
        server.terminate()
        server.wait(300)
        raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the three runs, interleaved (the figures per run)")
    args = parser.parse_args()
    port = _free_port()
    state = tempfile.mkdtemp(prefix="zion-h3-bench-")
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{REPO}", "ZION_TLS_STATE_DIR": state}
    server, worker = start_zion(port, env)
    try:
        results: list[tuple[str, int, float, float]] = []
        for _ in range(args.rounds):
            cpu = _cpu_seconds(worker)
            start = time.perf_counter()
            h2load = subprocess.run(
                ["h2load", "-n", str(args.requests), "-c", str(args.connections), "-m",
                 str(args.streams), f"https://127.0.0.1:{port}/"], capture_output=True,
                text=True)
            wall = time.perf_counter() - start
            found = re.search(r"(\d+) succeeded", h2load.stdout)
            succeeded = int(found.group(1)) if found else 0
            results.append(("HTTP/2 (h2load)", succeeded, _cpu_seconds(worker) - cpu, wall))
            for coalesce in (False, True):
                _Client.coalesce = coalesce
                cpu = _cpu_seconds(worker)
                start = time.perf_counter()
                ok = asyncio.run(_h3(port, args.requests, args.connections, args.streams))
                wall = time.perf_counter() - start
                name = "HTTP/3 (aioquic, batched)" if coalesce else "HTTP/3 (aioquic client)"
                results.append((name, ok, _cpu_seconds(worker) - cpu, wall))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    print(f"{'protocol':<26}{'ok':>7}{'server CPU/req':>16}{'req/s (client-bound)':>22}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    for name, ok, cpu_s, wall in results:
        per = cpu_s / ok * 1e6 if ok else float("nan")
        print(f"{name:<26}{ok:>7}{per:>13.0f} µs{ok / wall:>22.0f}")


if __name__ == "__main__":
    main()
