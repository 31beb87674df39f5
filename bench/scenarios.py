"""Every scenario bench/run.py measures, declared in one place: what it
does, how long it runs (--quick and full), with how many workers, which app,
which servers it applies to, and whether its rounds interleave the servers.

A scenario is a function (server, start context, seconds) -> a dict of raw
figures; report.py renders them."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import load
from servers import WORK, Ctx, Running, ServerDef
from tls_setup import client_context


def throughput(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """A: wrk keep-alive, 64 connections; B: wrk with `Connection: close`, a new
    TCP+TLS connection per request, 32 connections; then resumption."""
    run = Running(sdef, ctx, WORK / "logs")
    try:
        load.wrk(run.port, 64, max(1, secs / 2))                 # warm-up, keep-alive
        load.wrk(run.port, 32, max(1, secs / 3), close=True)     # warm-up, new connections
        cpu0 = run.cpu_seconds()
        a = load.wrk(run.port, 64, secs)
        a["server_cpu_s"] = run.cpu_seconds() - cpu0
        a["server_cpu_per_req_us"] = a["server_cpu_s"] / max(a["requests"], 1) * 1e6
        mem = run.memory_mib()
        workers = [str(p) for p in run.workers()]
        a["rss_worker_mib"] = statistics.mean(mem[p][0] for p in workers if p in mem)
        a["pss_worker_mib"] = statistics.mean(mem[p][1] for p in workers if p in mem)
        a["pss_total_mib"] = sum(v[1] for v in mem.values())
        time.sleep(1)
        cpu0 = run.cpu_seconds()
        b = load.wrk(run.port, 32, secs, close=True)
        b["server_cpu_s"] = run.cpu_seconds() - cpu0
        b["server_cpu_per_conn_us"] = b["server_cpu_s"] / max(b["requests"], 1) * 1e6
        b.update(load.resumption(run.port, 100))
        return {"A": a, "B": b, "argv": run.argv, "tls": load.tls_facts(run.port),
                "loadavg_1m": os.getloadavg()[0]}
    finally:
        run.stop()


def stalled(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """4 workers; one SIGSTOPped for 2 s from t=1 s; fresh connections throughout."""
    run = Running(sdef, ctx, WORK / "logs")
    victim = run.workers()[1]
    try:
        timeline = [(1.0, lambda: os.kill(victim, signal.SIGSTOP)),
                    (3.0, lambda: os.kill(victim, signal.SIGCONT))]
        records = load.fresh_connections(run.port, secs, 400, timeline=timeline, timeout=5.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
        run.stop()
    lat = [r.latency_ms for r in records if r.ok]
    return {"connections": len(records), "failed": sum(not r.ok for r in records),
            "slow_over_1s": sum(r.ok and r.latency_ms > 1000 for r in records),
            # When the slow ones started (the freeze is at 1.0 s): connections the
            # worker had accepted just before it froze wait for it whatever steers.
            "slow_at_s": [round(r.start, 3) for r in records if r.ok and r.latency_ms > 1000],
            "p99_ms": load.percentile(lat, 99), "max_ms": max(lat, default=float("nan")),
            "timeline": [(round(r.start, 4), round(r.latency_ms, 2), r.ok) for r in records]}


def mixed(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """5 % of requests hold their worker for 200 ms; p99 of the others."""
    run = Running(sdef, ctx, WORK / "logs")
    try:
        records = load.fresh_connections(
            run.port, secs, 150, choose=lambda rng: ("/heavy", "heavy") if rng.random() < 0.05
            else ("/", "light"))
    finally:
        run.stop()
    light = [r.latency_ms for r in records if r.kind == "light" and r.ok]
    return {"light_requests": len(light), "heavy_requests": sum(r.kind == "heavy"
                                                                for r in records),
            "failed": sum(not r.ok for r in records),
            "light_p50_ms": load.percentile(light, 50), "light_p99_ms": load.percentile(light, 99)}


def reloads(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """Reloads evenly spaced (one per 1.5 s, at least 3) under 300 new connections/s."""
    count = max(3, int(secs / 1.5))
    run = Running(sdef, ctx, WORK / "logs")
    sig = sdef.reload_signal
    assert sig is not None
    try:
        step = secs / (count + 1)
        timeline = [(step * (i + 1), lambda: run.proc.send_signal(sig)) for i in range(count)]
        records = load.fresh_connections(run.port, secs, 300, timeline=timeline)
        alive = run.proc.poll() is None
    finally:
        run.stop()
    return {"requests": len(records), "failed": sum(not r.ok for r in records),
            "reloads": count, "server_survived": alive}


def http3(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """HTTP/3 GETs of the small answer, one worker: aioquic's client
    (bench/h3_server.py's, pure Python, in this process: req/s is
    client-bound, server CPU per request is the comparable figure), 4
    connections x 10 streams, each loop iteration's requests coalesced into
    one transmission as h2load does; a 1 s warm-up first."""
    import asyncio
    import resource

    import h3_server  # aioquic: only this scenario needs it

    h3_server._Client.coalesce = True
    run = Running(sdef, ctx, WORK / "logs")
    try:
        asyncio.run(h3_server.h3_for(run.port, 1.0, 4, 10))
        cpu0 = run.cpu_seconds()
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        out: dict = asyncio.run(h3_server.h3_for(run.port, secs, 4, 10))
        out["server_cpu_s"] = run.cpu_seconds() - cpu0
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        out["client_cpu_s"] = (client1.ru_utime - client0.ru_utime
                               + client1.ru_stime - client0.ru_stime)
        out["server_cpu_per_req_us"] = out["server_cpu_s"] / max(out["requests"], 1) * 1e6
        out.update(argv=run.argv, loadavg_1m=os.getloadavg()[0],
                   processes=len(run.tree()))
        return out
    finally:
        run.stop()


def websocket(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """WebSocket echo over wss: small and 16 KiB text messages, 16 connections."""
    run = Running(sdef, ctx, WORK / "logs")
    out = {}
    try:
        for size in (64, 16384):
            load.ws_echo(run.port, 16, 1.0, size)  # warm-up
            cpu0 = run.cpu_seconds()
            res = load.ws_echo(run.port, 16, secs, size)
            res["server_cpu_s"] = run.cpu_seconds() - cpu0
            res["server_cpu_per_msg_us"] = res["server_cpu_s"] / max(res["messages"], 1) * 1e6
            out[str(size)] = res
    finally:
        run.stop()
    return out


FILE_SIZES = {"1m.bin": 1 << 20, "100m.bin": 100 << 20}


def _make_files() -> None:
    """bench/.work/files: made once, random (no compression shortcut anywhere)."""
    root = WORK / "files"
    root.mkdir(parents=True, exist_ok=True)
    for name, size in FILE_SIZES.items():
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            with open(path.with_suffix(".tmp"), "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
            path.with_suffix(".tmp").rename(path)


def files(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
    """GET of a 1 MiB file (wrk, 16 connections) and a 100 MiB one (4
    connections), keep-alive, over TLS or plain HTTP/1.1 (ctx.plain): the app
    sends http.response.pathsend where the server advertises it (zion,
    granian); nginx serves the files itself (over TLS without kTLS: read +
    SSL_write, like zion; plain: sendfile on, like zion)."""
    _make_files()
    run = Running(sdef, ctx, WORK / "logs")
    scheme = "http" if ctx.plain else "https"
    out: dict = {"argv": run.argv, "loadavg_1m": os.getloadavg()[0],
                 "pathsend": _uses_pathsend(run.port, scheme)}
    try:
        for name, conns in (("1m.bin", 16), ("100m.bin", 4)):
            path = f"/file/{name}"
            # Warm-up (page cache, TLS sessions); a 100 MiB answer may take seconds.
            load.wrk(run.port, conns, 1, path=path, scheme=scheme, timeout=30)
            cpu0 = run.cpu_seconds()
            res = load.wrk(run.port, conns, secs, path=path, scheme=scheme, timeout=30)
            res["server_cpu_s"] = run.cpu_seconds() - cpu0
            res["server_cpu_per_req_ms"] = res["server_cpu_s"] / max(res["requests"], 1) * 1e3
            res["mib_per_s"] = res["rps"] * FILE_SIZES[name] / (1 << 20)
            res.pop("raw", None)
            out[name] = res
    finally:
        run.stop()
    return out


def _uses_pathsend(port: int, scheme: str) -> str:
    """What the app reported in x-pathsend (nginx: no app, no header)."""
    import http.client

    conn = (http.client.HTTPConnection("127.0.0.1", port, timeout=10) if scheme == "http" else
            http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=client_context()))
    try:
        conn.request("GET", "/file/1m.bin")
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("x-pathsend") or "-"
    finally:
        conn.close()


@dataclass(frozen=True)
class Scenario:
    name: str
    measure: Callable[[ServerDef, Ctx, float], dict]
    seconds: tuple[float, float]  # (--quick, full) per run
    applies: Callable[[ServerDef], bool]
    workers: int = 2
    app: str = "app:app"
    # Rounds alternate the servers (A B C A B C ...) and keep every round, so
    # machine noise falls on all of them alike; otherwise one run per server.
    interleaved: bool = False
    # Errors are a result ("unsupported"), not the end of the run.
    may_fail: bool = False
    plain: bool = False  # plain HTTP/1.1 instead of HTTPS (zion --no-tls)

    def seconds_for(self, quick: bool) -> float:
        return self.seconds[0] if quick else self.seconds[1]


# Servers that exist for the http3 scenario only (the others run them over TCP).
_H3_SERVERS = ("zion-h3", "hypercorn-h3")


def _http(s: ServerDef) -> bool:
    # uvicorn-wsproto differs from uvicorn only in its WebSocket implementation.
    return s.name != "uvicorn-wsproto" and s.name not in _H3_SERVERS


def _app_server(s: ServerDef) -> bool:
    # The floor answers every path at once and nginx does not run the Python app.
    return _http(s) and s.family not in ("floor", "nginx")


# zion-before (ZION_BENCH_BEFORE) shows what pathsend and sendfile changed.
_FILE_SERVERS = ("zion", "zion-before", "granian", "nginx")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("throughput", throughput, (3.0, 10.0), _http, interleaved=True),
    Scenario("stalled", stalled, (4.0, 6.0), lambda s: _http(s) and s.family != "floor",
             workers=4),
    Scenario("mixed", mixed, (4.0, 10.0), _app_server, workers=4, app="app:app_mixed"),
    Scenario("reload", reloads, (6.0, 15.0),
             lambda s: _http(s) and s.family != "floor" and s.reload_signal is not None),
    Scenario("files", files, (4.0, 10.0),
             lambda s: s.name in _FILE_SERVERS, app="app:app_files",
             interleaved=True),
    Scenario("files-plain", files, (4.0, 10.0),
             lambda s: s.name in _FILE_SERVERS, app="app:app_files",
             interleaved=True, plain=True),
    Scenario("websocket", websocket, (3.0, 10.0),
             lambda s: s.family in ("zion", "uvicorn", "granian", "hypercorn")
             and s.name not in ("zion-hash", "zion-nodemux", *_H3_SERVERS),
             interleaved=True, may_fail=True),
    # hypercorn has one HTTP/3 worker at most (pgjones/hypercorn#114): both get one.
    Scenario("http3", http3, (5.0, 10.0), lambda s: s.name in _H3_SERVERS, workers=1,
             interleaved=True),
)
BY_NAME = {s.name: s for s in SCENARIOS}
