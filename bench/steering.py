"""Steering scenarios (issue 13): where new connections go when workers block,
freeze, die or are retired, and how a burst of keep-alive connections splits.

    bench/.work/venv/bin/python bench/steering.py [--rounds 3] [--quick]

- mixed: 4 workers, open-loop 150 new TLS connections/s, a request that
  blocks its worker for 200 ms every 20th ("fixed") or with probability 5 %
  ("random"); light-request p50/p99/p99.9 and share over 100 ms, for zion,
  zion --no-bpf-demux (the kernel's reuseport hash) and uvicorn (one shared
  accept queue). Servers interleave within each round; medians of rounds.
- stalled: one of 4 workers SIGSTOPped for 2 s at 400 new connections/s.
- kill / shrink: a worker SIGKILLed, or a reload from 4 to 2 workers, under
  300 new connections/s, with net.ipv4.tcp_migrate_req 0 and 1 (the server
  and the client run in a network namespace of their own, where the sysctl
  is set, so the machine's own setting is left alone).
- burst: 64 keep-alive connections opened at once across 4 workers: how many
  each worker got (max/min), against uvicorn, gunicorn and hypercorn.

Results: bench/results/<stamp>-steering.md and .json.gz.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import gzip
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
from scenarios import stalled
from servers import REPO, SERVERS, WORK, Ctx, Running, ServerDef
from tls_setup import client_context, make_cert

RESULTS = Path(__file__).resolve().parent / "results"
BY_NAME = {s.name: s for s in SERVERS}


# -- mixed load --------------------------------------------------------------------

def _chooser(pattern: str) -> Callable[[random.Random], tuple[str, str]]:
    count = itertools.count(1)
    if pattern == "fixed":
        return lambda rng: ("/heavy", "heavy") if next(count) % 20 == 0 else ("/", "light")
    return lambda rng: ("/heavy", "heavy") if rng.random() < 0.05 else ("/", "light")


def mixed(sdef: ServerDef, ctx: Ctx, pattern: str, secs: float) -> dict:
    run = Running(sdef, ctx, WORK / "logs")
    try:
        records = load.fresh_connections(run.port, secs, 150, choose=_chooser(pattern))
    finally:
        run.stop()
    light = [r.latency_ms for r in records if r.kind == "light" and r.ok]
    return {"light": len(light), "heavy": sum(r.kind == "heavy" for r in records),
            "failed": sum(not r.ok for r in records),
            "p50_ms": load.percentile(light, 50), "p99_ms": load.percentile(light, 99),
            "p999_ms": load.percentile(light, 99.9),
            "over_100ms_pct": 100 * sum(x > 100 for x in light) / max(len(light), 1)}


# -- a worker killed, a shrink, in a namespace with tcp_migrate_req set --------------

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(migrate_req: str, body: Callable[[], dict]) -> dict:
    """Run `body` on a thread that joined a fresh network namespace with
    loopback up and tcp_migrate_req set: the servers it starts (forked from
    that thread) and its client sockets live there."""
    name = f"steer-bench-{os.getpid()}"
    ip = ["ip", "netns"]
    subprocess.run([*ip, "del", name], capture_output=True)
    subprocess.run([*ip, "add", name], check=True, capture_output=True)
    out: dict[str, Any] = {}
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run([*ip, "exec", name, "sysctl", "-q", "-w",
                        f"net.ipv4.tcp_migrate_req={migrate_req}"], check=True)

        def thread() -> None:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            try:
                out["value"] = body()
            except BaseException as exc:
                out["error"] = exc

        t = threading.Thread(target=thread)
        t.start()
        t.join()
    finally:
        subprocess.run([*ip, "del", name], capture_output=True)
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


@dataclass
class WithConfig(ServerDef):
    """zion with its worker count in a config file, so a reload can change it."""

    config: Path | None = None

    def argv(self, ctx: Ctx, port: int) -> list[str]:
        argv = super().argv(ctx, port)
        at = argv.index("--workers")
        del argv[at:at + 2]
        return [*argv, "--config", str(self.config)]


def disrupted(sdef: ServerDef, ctx: Ctx, what: str, secs: float) -> dict:
    config = WORK / f"steer-{os.getpid()}.toml"
    config.write_text(f"[server]\nworkers = {ctx.workers}\n")
    with_config = WithConfig(sdef.name, sdef.family, sdef.extra, sdef.reload_signal, config)
    run = Running(with_config, ctx, WORK / "logs")
    try:
        if what == "kill":
            victim = run.workers()[1]
            action = lambda: os.kill(victim, signal.SIGKILL)  # noqa: E731
        else:
            def action() -> None:
                config.write_text("[server]\nworkers = 2\n")
                run.proc.send_signal(signal.SIGHUP)
        records = load.fresh_connections(run.port, secs, 300, timeline=[(2.0, action)],
                                         timeout=5.0)
    finally:
        run.stop()
        config.unlink()
    # When the failed ones started (the event is at 2.0 s): a SIGKILLed worker
    # takes down the connections it had already accepted, which no queue
    # hand-over can save; anything failing later would be the steering's fault.
    return {"connections": len(records), "failed": sum(not r.ok for r in records),
            "failed_at_s": [round(r.start, 3) for r in records if not r.ok],
            "slow_at_s": [round(r.start, 3) for r in records if r.ok and r.latency_ms > 1000],
            "over_1s": sum(r.ok and r.latency_ms > 1000 for r in records)}


# -- a burst of keep-alive connections ------------------------------------------------

def burst(sdef: ServerDef, ctx: Ctx, count: int = 64) -> dict:
    run = Running(sdef, ctx, WORK / "logs")
    try:
        pids = asyncio.run(_burst(run.port, count))
    finally:
        run.stop()
    split = sorted(Counter(pids).values(), reverse=True)
    split += [0] * (ctx.workers - len(split))
    return {"split": split, "max_over_min": split[0] / split[-1] if split[-1] else
            float("inf"), "failed": count - len(pids)}


async def _burst(port: int, count: int) -> list[str]:
    ctx = client_context()
    opened = await asyncio.gather(*(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost") for _ in range(count)),
        return_exceptions=True)
    pids = []
    for item in opened:
        if isinstance(item, BaseException):
            continue
        reader, writer = item
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("x-pid:"):
                pids.append(line.split(":", 1)[1].strip())
    for item in opened:
        if not isinstance(item, BaseException):
            item[1].close()
    return pids


# -- the run ------------------------------------------------------------------------

def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) == r.get(key)]  # drop NaN
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, short runs")
    parser.add_argument("--scenarios", default="mixed,stalled,disrupted,burst")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    secs = 4.0 if args.quick else 10.0
    wanted = set(args.scenarios.split(","))
    cert, key = make_cert()
    ctx_mixed = Ctx(cert, key, workers=4, app="app:app_mixed")
    ctx4 = Ctx(cert, key, workers=4)
    ctx_pid = Ctx(cert, key, workers=4, app="app:app_pid")
    results: dict[str, Any] = {"mixed": {}, "stalled": {}, "disrupted": {}, "burst": {}}
    load_before = os.getloadavg()
    started = time.time()
    for r in range(rounds):
        for pattern in ("fixed", "random") if "mixed" in wanted else ():
            for name in ("zion", "zion-nodemux", "uvicorn"):
                print(f"round {r + 1}: mixed {pattern} {name}", file=sys.stderr, flush=True)
                results["mixed"].setdefault(f"{pattern}/{name}", []).append(
                    mixed(BY_NAME[name], ctx_mixed, pattern, secs))
        for name in ("zion", "uvicorn") if "stalled" in wanted else ():
            print(f"round {r + 1}: stalled {name}", file=sys.stderr, flush=True)
            results["stalled"].setdefault(name, []).append(stalled(BY_NAME[name], ctx4, 6.0))
        for what, req, name in itertools.product(("kill", "shrink"), ("0", "1"),
                                                 ("zion", "zion-nodemux")):
            if "disrupted" not in wanted:
                break
            print(f"round {r + 1}: {what} tcp_migrate_req={req} {name}", file=sys.stderr,
                  flush=True)
            results["disrupted"].setdefault(f"{what}/{req}/{name}", []).append(in_netns(
                req, lambda w=what, n=name: disrupted(BY_NAME[n], ctx4, w, 8.0)))
        for name in ("zion", "uvicorn", "gunicorn-uvicorn", "hypercorn"):
            if "burst" not in wanted:
                break
            print(f"round {r + 1}: burst {name}", file=sys.stderr, flush=True)
            results["burst"].setdefault(name, []).append(burst(BY_NAME[name], ctx_pid))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rounds": rounds, "seconds": secs, "commit": commit,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "elapsed_s": round(time.time() - started, 1), "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = RESULTS / f"{stamp}-steering.json.gz"
    raw.write_bytes(gzip.compress(json.dumps(results, indent=1).encode(), mtime=0))
    md = RESULTS / f"{stamp}-steering.md"
    md.write_text(report(results))
    print(md.read_text())
    print(f"wrote {raw} and {md}", file=sys.stderr)
    return 0


def report(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Steering (issue 13), {meta['date']}, commit {meta['commit']}", "",
           f"{meta['rounds']} rounds, medians (min-max in the raw JSON). Load average "
           f"before/after: {', '.join(f'{x:.1f}' for x in meta['loadavg_before'])} / "
           f"{', '.join(f'{x:.1f}' for x in meta['loadavg_after'])} on {meta['cpus']} CPUs "
           "shared with other work: compare servers within a round, not with other runs.", ""]
    if results["mixed"]:
        out += ["## Mixed load: 150 new TLS connections/s, 4 workers, 200 ms blocking requests",
                "", "| heavy | server | light p50 ms | p99 ms | p99.9 ms | > 100 ms % | failed |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for key, rows in results["mixed"].items():
            pattern, name = key.split("/")
            out.append(f"| {pattern} | {name} | {_median(rows, 'p50_ms'):.1f} | "
                        f"{_median(rows, 'p99_ms'):.1f} | {_median(rows, 'p999_ms'):.1f} | "
                        f"{_median(rows, 'over_100ms_pct'):.2f} | "
                        f"{sum(r['failed'] for r in rows)} |")
        out.append("")
    if results["stalled"]:
        out += ["## One of 4 workers stopped for 2 s at 400 new connections/s", "",
                "| server | connections | over 1 s (each round) | failed | p99 ms | "
                "slow ones started at (s; freeze at 1.0) |", "|---|---:|---|---:|---:|---|"]
        for name, rows in results["stalled"].items():
            started = sorted(t for r in rows for t in r.get("slow_at_s", []))
            out.append(f"| {name} | {_median(rows, 'connections'):.0f} | "
                       f"{[r['slow_over_1s'] for r in rows]} | {sum(r['failed'] for r in rows)} | "
                       f"{_median(rows, 'p99_ms'):.1f} | "
                       f"{', '.join(f'{t:.3f}' for t in started[:8])} |")
        out.append("")
    if results["disrupted"]:
        out += ["## A worker SIGKILLed / a reload 4 -> 2 at 300 new connections/s", "",
                "| event | tcp_migrate_req | server | connections | failed (each round) | "
                "over 1 s | failed ones started at (s; event at 2.0) |",
                "|---|---|---|---:|---|---:|---|"]
        for key, rows in results["disrupted"].items():
            what, req, name = key.split("/")
            started = sorted(t for r in rows for t in r.get("failed_at_s", []))
            out.append(f"| {what} | {req} | {name} | {_median(rows, 'connections'):.0f} | "
                       f"{[r['failed'] for r in rows]} | {sum(r['over_1s'] for r in rows)} | "
                       f"{', '.join(f'{t:.3f}' for t in started[:8])} |")
        out.append("")
    if results["burst"]:
        out += ["## 64 keep-alive connections opened at once, 4 workers", "",
                "| server | split per round (connections per worker) | max/min (median) |",
                "|---|---|---:|"]
        for name, rows in results["burst"].items():
            out.append(f"| {name} | {' ; '.join('/'.join(map(str, r['split'])) for r in rows)}"
                       f" | {_median(rows, 'max_over_min'):.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
