"""zion side by side with uvicorn, gunicorn, granian, hypercorn and nginx.

    bench/run.sh --quick     one round, short runs (about 2-3 minutes)
    bench/run.sh             three interleaved rounds and every scenario

Method: rounds interleave the servers (A B C ... A B C ...), each server starts
fresh with a warm-up; medians with min-max; server CPU from /proc over the
whole process tree and the client's CPU from rusage, because wrk shares the
2 cores and can be the bottleneck. Results: bench/results/<stamp>-<mode>.md and
PNG plots in git; every raw figure and command in <stamp>-<mode>.json.gz beside
them (gzip keeps a full run near 100 KiB instead of 1 MB of JSON).
and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import report
from servers import NON_DEFAULTS, REPO, SERVERS, WORK, Ctx, Running, ServerDef

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("throughput", "stalled", "mixed", "reload", "websocket")


def make_cert() -> tuple[Path, Path]:
    certs = WORK / "certs"
    cert, key = certs / "cert.pem", certs / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    certs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-out", str(cert),
                    "-days", "365", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True,
                   capture_output=True)
    return cert, key


def throughput(sdef: ServerDef, ctx: Ctx, secs: float) -> dict:
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


def reloads(sdef: ServerDef, ctx: Ctx, secs: float, count: int) -> dict:
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


def versions() -> dict:
    from servers import VENV
    out = subprocess.run([str(VENV / "bin/pip"), "freeze"], capture_output=True,
                         text=True).stdout.split()
    ours = subprocess.run([str(REPO / ".venv/bin/pip"), "freeze"], capture_output=True,
                          text=True).stdout.split()
    tools = {}
    for tool, argv in {"wrk": ["wrk", "-v"], "nginx": ["/usr/sbin/nginx", "-v"],
                       "openssl": ["openssl", "version"]}.items():
        res = subprocess.run(argv, capture_output=True, text=True)
        tools[tool] = (res.stdout + res.stderr).strip().splitlines()[0] if (
            res.stdout + res.stderr).strip() else "?"
    return {"peers": out, "zion_env": ours, "tools": tools}


PINNED_OPENSSL_CONF = Path(__file__).resolve().parent / "openssl-x25519.cnf"


def pin_clients_to_x25519() -> None:
    """Every client offers only X25519 (bench/openssl-x25519.cnf). OpenSSL
    reads its config once, at start: re-exec so this process's own Python
    clients are pinned too, not only wrk and openssl that inherit it."""
    if os.environ.get("OPENSSL_CONF") != str(PINNED_OPENSSL_CONF):
        os.environ["OPENSSL_CONF"] = str(PINNED_OPENSSL_CONF)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> int:
    pin_clients_to_x25519()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, short runs")
    parser.add_argument("--servers", help="comma-separated subset, e.g. zion,uvicorn")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--report", metavar="JSON",
                        help="only re-render the Markdown and plots of a saved run")
    args = parser.parse_args()
    if args.report:
        saved = Path(args.report)
        raw = gzip.decompress(saved.read_bytes()) if saved.suffix == ".gz" else saved.read_bytes()
        stamp = saved.name.split(".")[0].rsplit("-", 1)[0]
        print(report.write(json.loads(raw), saved.parent, stamp))
        return 0
    quick = args.quick
    rounds = 1 if quick else 3
    secs = 3.0 if quick else 10.0
    chosen = [s for s in SERVERS if not args.servers or s.name in args.servers.split(",")]
    wanted = set(args.scenarios.split(","))
    cert, key = make_cert()
    ctx2 = Ctx(cert, key, workers=2)
    started = time.time()
    # uvicorn-wsproto differs from uvicorn only in its WebSocket implementation.
    http_servers = [s for s in chosen if s.name != "uvicorn-wsproto"]
    results: dict = {"throughput": {s.name: [] for s in http_servers}}
    for r in range(rounds if "throughput" in wanted else 0):
        for sdef in http_servers:
            print(f"round {r + 1}/{rounds}: {sdef.name}", file=sys.stderr, flush=True)
            results["throughput"][sdef.name].append(throughput(sdef, ctx2, secs))
    # The floor answers every path at once: the scenarios would measure nothing.
    scenario_servers = [s for s in http_servers if s.family != "floor" and (not quick or s.name in (
        "zion", "zion-nodemux", "uvicorn", "nginx"))]
    ctx4 = Ctx(cert, key, workers=4)
    results["stalled"] = {}
    for sdef in scenario_servers if "stalled" in wanted else []:
        print(f"stalled worker: {sdef.name}", file=sys.stderr, flush=True)
        results["stalled"][sdef.name] = stalled(sdef, ctx4, 4.0 if quick else 6.0)
    ctx_mixed = Ctx(cert, key, workers=4, app="app:app_mixed")
    results["mixed"] = {}
    for sdef in scenario_servers if "mixed" in wanted else []:
        if sdef.family == "nginx":
            continue  # nginx does not run the Python app
        print(f"mixed load: {sdef.name}", file=sys.stderr, flush=True)
        results["mixed"][sdef.name] = mixed(sdef, ctx_mixed, 4.0 if quick else 10.0)
    results["reload"] = {}
    for sdef in scenario_servers if "reload" in wanted else []:
        if sdef.reload_signal is None:
            continue
        print(f"reload under load: {sdef.name}", file=sys.stderr, flush=True)
        results["reload"][sdef.name] = reloads(sdef, ctx2, 6.0 if quick else 15.0,
                                               3 if quick else 10)
    results["websocket"] = {}
    ws_servers = [s for s in chosen if s.family in ("zion", "uvicorn", "granian", "hypercorn")
                  and s.name not in ("zion-hash", "zion-nodemux")]
    for r in range(rounds if "websocket" in wanted else 0):
        for sdef in ws_servers:
            print(f"websocket echo {r + 1}/{rounds}: {sdef.name}", file=sys.stderr, flush=True)
            try:
                res = websocket(sdef, ctx2, secs)
            except Exception as exc:
                res = {"unsupported": repr(exc)}
            results["websocket"].setdefault(sdef.name, []).append(res)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    runs = [r for rs in results["throughput"].values() for r in rs]
    results["meta"] = {
        # The 1-minute load average after each throughput run: other work on
        # the machine shows up here (the bench itself keeps it near 2-3).
        "loadavg_1m": [round(r["loadavg_1m"], 2) for r in runs if "loadavg_1m" in r],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full", "rounds": rounds, "seconds_per_run": secs,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "cpu": _cpu_model(), "python": platform.python_version()},
        "commit": commit, "versions": versions(), "non_defaults": NON_DEFAULTS,
        "elapsed_s": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}-{results['meta']['mode']}.json.gz"
    out.write_bytes(gzip.compress(json.dumps(results, indent=1).encode(), mtime=0))
    md = report.write(results, RESULTS, stamp)
    print(f"wrote {out} and {md}", file=sys.stderr)
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
