"""Load generators: wrk for throughput, a Python asyncio client for the
scenarios that need per-connection records (stall, mixed, reload)."""

from __future__ import annotations

import asyncio
import random
import re
import resource
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from tls_setup import client_context

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(port: int, conns: int, seconds: float, close: bool = False, path: str = "/",
        scheme: str = "https", timeout: float = 2.0) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if timeout != 2.0:  # wrk's default
        argv += ["--timeout", f"{timeout:g}s"]
    argv.append(f"{scheme}://127.0.0.1:{port}{path}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "argv": argv,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "socket_errors": 0,
        "non_2xx": 0,
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "seconds": max(1, round(seconds)),
        "raw": out,
    }
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        result["socket_errors"] = sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non_2xx"] = int(m.group(1))
    return result


def tls_facts(port: int) -> dict:
    """What one handshake negotiated, as OpenSSL's client reports it: the key
    exchange group and the certificate's signature type decide most of a full
    handshake's cost, so every server's row records them."""
    res = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", "localhost", "-brief", "-alpn", "http/1.1"],
                         input="", capture_output=True, text=True, timeout=10)
    text = res.stdout + res.stderr
    facts = {}
    for key, pattern in {"protocol": r"Protocol version:\s*(\S+)",
                         "cipher": r"Ciphersuite:\s*(\S+)",
                         "signature": r"(?:Peer )?[Ss]ignature type:\s*(\S+)",
                         "group": r"Server Temp Key:\s*([^,\n]+)"}.items():
        m = re.search(pattern, text)
        facts[key] = m.group(1) if m else "?"
    return facts


def resumption(port: int, n: int = 200) -> dict:
    """Sequential fresh connections offering the last session ticket, as wrk does."""
    ctx = client_context()
    session = None
    resumed = 0
    version = None
    for _ in range(n):
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls):
            tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
            resumed += tls.session_reused
            version = tls.version()
            session = tls.session
    return {"tls_version": version, "resumed_share": resumed / n, "connections": n}


@dataclass
class Record:
    start: float  # seconds since the scenario began
    latency_ms: float
    ok: bool
    kind: str


async def _one(port: int, path: str, ctx: ssl.SSLContext, timeout: float) -> bool:
    async def go() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="localhost")
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                         .encode())
            data = await reader.read()
            return data.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
        return False


def fresh_connections(port: int, seconds: float, rate: float,
                      choose: Callable[[random.Random], tuple[str, str]] | None = None,
                      timeline: list[tuple[float, Callable[[], None]]] | None = None,
                      timeout: float = 5.0, max_outstanding: int = 2000) -> list[Record]:
    """Open loop: a new TLS connection every 1/`rate` s, whether or not earlier
    ones were answered, so a stuck worker cannot slow the arrivals down and
    hide itself (a closed loop would: coordinated omission). `timeline`
    actions (SIGSTOP, SIGHUP...) fire at their offsets."""
    choose = choose or (lambda rng: ("/", "light"))

    async def main() -> list[Record]:
        ctx = client_context()
        records: list[Record] = []
        rng = random.Random(7)
        t0 = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        skipped = 0

        async def one(path: str, kind: str) -> None:
            start = time.monotonic()
            ok = await _one(port, path, ctx, timeout)
            records.append(Record(start - t0, (time.monotonic() - start) * 1000, ok, kind))

        async def actions() -> None:
            for at, action in timeline or []:
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                action()

        acting = asyncio.create_task(actions())
        n = 0
        while (due := t0 + n / rate) < t0 + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            n += 1
            if len(pending) >= max_outstanding:
                skipped += 1
                continue
            task = asyncio.create_task(one(*choose(rng)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(acting, *pending)
        if skipped:
            records.extend(Record(seconds, float("nan"), False, "not-sent")
                           for _ in range(skipped))
        return records

    return asyncio.run(main())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ws_echo(port: int, conns: int, seconds: float, size: int) -> dict:
    """`conns` WebSocket connections (wss, the `websockets` client), each
    sending a `size`-byte text message and waiting for its echo, for `seconds`."""
    return asyncio.run(_ws_echo(port, conns, seconds, size))


async def _ws_echo(port: int, conns: int, seconds: float, size: int) -> dict:
    import websockets

    ctx = client_context()
    payload = "x" * size
    counts = [0] * conns
    errors = 0
    latencies: list[float] = []
    before = resource.getrusage(resource.RUSAGE_SELF)

    async def one(i: int, deadline: float) -> None:
        nonlocal errors
        try:
            async with websockets.connect(f"wss://127.0.0.1:{port}/ws", ssl=ctx,
                                          max_size=None, compression=None) as ws:
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    await ws.send(payload)
                    if len(await ws.recv()) != size:
                        errors += 1
                    latencies.append((time.perf_counter() - t0) * 1000)
                    counts[i] += 1
        except Exception:
            errors += 1

    start = time.monotonic()
    await asyncio.gather(*(one(i, start + seconds) for i in range(conns)))
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"messages": sum(counts), "msgs_per_s": sum(counts) / elapsed, "errors": errors,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime
                                                                 + before.ru_stime),
            "seconds": elapsed, "conns": conns, "size": size}
