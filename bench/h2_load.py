"""HTTP/2 throughput: h2load (nghttp2-client) against zion, granian, hypercorn
and uvicorn (0.53+: `--http zttp --http2`) serving the same app
(bench/app.py) with the same certificate and 2 workers, plus zion over
HTTP/1.1 (h2load --h1) for the ratio the issue asks for.

Two shapes: one request at a time per connection (-m 1: the same work as
HTTP/1.1 keep-alive, so "h2 -m 1 / h1" is the fair ratio), and 16 streams
at a time per connection (-m 16: what HTTP/2 is for). Server CPU per request
is the whole process tree's utime+stime over the run, divided by the
requests answered. Rounds are interleaved (every case once, then again) and
the median round is reported, with the load average before and after.

    .venv/bin/python bench/h2_load.py [--clients 16] [--rounds 3] [--out bench/results]
    bench/run.sh --h2 [same flags]   # from a fresh clone: installs the servers first

It ends with the two ratios issue 19 asks for: zion's HTTP/2 one stream at a
time against its own HTTP/1.1 (goal >= 0.9), and zion at 16 streams against
granian --http 2 (goal >= 1.0), by median req/s and round by round (the
rounds are interleaved, so each round's cases ran under the same load).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import WORK, Ctx, Running, ServerDef
from tls_setup import make_cert

ZION = ServerDef("zion", "zion")
# (label, server, h2load protocol flags, streams per connection)
CASES = [
    ("zion HTTP/1.1", ZION, ["--h1"], 1),
    ("zion HTTP/2 -m 1", ZION, [], 1),
    ("zion HTTP/2 -m 16", ZION, [], 16),
    ("granian HTTP/2 -m 1", ServerDef("granian", "granian"), [], 1),
    ("granian HTTP/2 -m 16", ServerDef("granian", "granian"), [], 16),
    ("uvicorn (zttp) HTTP/2 -m 1", ServerDef("uvicorn", "uvicorn", ["--http", "zttp", "--http2"]),
     [], 1),
    ("uvicorn (zttp) HTTP/2 -m 16",
     ServerDef("uvicorn", "uvicorn", ["--http", "zttp", "--http2"]), [], 16),
    ("hypercorn HTTP/2 -m 16", ServerDef("hypercorn", "hypercorn"), [], 16),
]

# Under 3000 streams a connection: past that zion hands the connection to a
# fresh zttp codec (zion/http/h2.py), a once-per-3000 cost left out here to
# compare the per-request path (tests/http/test_h2_server.py runs h2load far
# past it, 0 failed).
PER_CONNECTION = 2900


def h2load(port: int, requests: int, clients: int, streams: int, extra: list[str]) -> dict:
    argv = ["h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams),
            "-t", "1", *extra, f"https://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    return {"done": int(done.group(1)) if done else 0,
            "ok": int(done.group(2)) if done else 0,
            "failed": int(done.group(3)) if done else -1,
            "rps": float(rps.group(1)) if rps else 0.0,
            "protocol": proto.group(1) if proto else "?"}


def run_case(sdef: ServerDef, ctx: Ctx, clients: int, streams: int,
             extra: list[str]) -> tuple[dict, float]:
    run = Running(sdef, ctx, WORK / "logs")
    try:
        h2load(run.port, clients * 200, clients, streams, extra)  # warm-up
        cpu0 = run.cpu_seconds()
        # h2load is the only child reaped meanwhile (the server is stopped after).
        mine0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = h2load(run.port, clients * PER_CONNECTION, clients, streams, extra)
        mine1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = run.cpu_seconds() - cpu0
    finally:
        run.stop()
    # The client shares the two CPUs: what it spends per request (HTTP/2 more
    # than HTTP/1.1, and more for bigger header blocks) moves req/s as well.
    client = (mine1.ru_utime - mine0.ru_utime) + (mine1.ru_stime - mine0.ru_stime)
    result["client_us"] = client / result["ok"] * 1e6 if result["ok"] else 0.0
    return result, (cpu / result["ok"] * 1e6 if result["ok"] else 0.0)


def verdict(runs: dict[str, list[tuple[dict, float]]]) -> list[str]:
    """The issue's two ratios, where both of their cases ran."""
    out = []
    for name, top, base, goal in (
            ("one stream: zion HTTP/2 -m 1 / zion HTTP/1.1", "zion HTTP/2 -m 1",
             "zion HTTP/1.1", 0.9),
            ("16 streams: zion HTTP/2 -m 16 / granian HTTP/2 -m 16", "zion HTTP/2 -m 16",
             "granian HTTP/2 -m 16", 1.0)):
        if not runs.get(top) or not runs.get(base):
            continue
        each = [a["rps"] / b["rps"] if b["rps"] else 0.0
                for (a, _), (b, _) in zip(runs[top], runs[base], strict=True)]
        median = (statistics.median(a["rps"] for a, _ in runs[top])
                  / (statistics.median(b["rps"] for b, _ in runs[base]) or 1.0))
        cpu = (statistics.median(u for _, u in runs[top])
               / (statistics.median(u for _, u in runs[base]) or 1.0))
        failed = max(r["failed"] for r, _ in runs[top] + runs[base])
        out.append(f"- {name}: {median:.2f} by median req/s (goal >= {goal}); rounds "
                   f"{', '.join(f'{x:.2f}' for x in each)} ({sum(x >= goal for x in each)} of "
                   f"{len(each)} at the goal); server CPU per request {cpu:.2f}x; "
                   f"failed {failed}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated label prefixes, e.g. zion,granian")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cert, key = make_cert()
    ctx = Ctx(cert, key)
    cases = [c for c in CASES if not args.only
             or any(c[0].startswith(p) for p in args.only.split(","))]
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[dict, float]]] = {label: [] for label, *_ in cases}
    for rnd in range(args.rounds):
        for label, sdef, extra, streams in cases:
            result, us = run_case(sdef, ctx, args.clients, streams, extra)
            runs[label].append((result, us))
            print(f"round {rnd + 1}", label, result, f"{us:.1f} µs/req", flush=True)
    load_after = os.getloadavg()
    rows = []
    for label, *_ in cases:
        results = runs[label]
        rps = statistics.median(r["rps"] for r, _ in results)
        us = statistics.median(u for _, u in results)
        failed = max(r["failed"] for r, _ in results)
        client = statistics.median(r["client_us"] for r, _ in results)
        rows.append((label, results[0][0]["protocol"], rps, us, client, failed,
                     [round(r["rps"]) for r, _ in results]))
    base = next((r for r in rows if r[0] == "zion HTTP/1.1"), None)
    lines = [
        f"# HTTP/2 load ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"h2load -n {args.clients * PER_CONNECTION} -c {args.clients} -t 1 (-m as labelled; "
        "HTTP/1.1 with --h1, one request at a time per connection); GET / of bench/app.py, "
        f"2 workers, loopback, the same certificate. {args.rounds} interleaved rounds, "
        "medians. Load average (1, 5, 15 min) before: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{' '.join(f'{x:.2f}' for x in load_after)} (2 CPUs, shared with other work).", "",
        "| server | protocol | req/s | vs zion h1 req/s | server CPU µs/req | vs zion h1 CPU "
        "| h2load CPU µs/req | failed | rounds req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, proto, rps, us, client, failed, each in rows:
        ratio_rps = f"{rps / base[2]:.2f}" if base and base[2] else "-"
        ratio_cpu = f"{us / base[3]:.2f}" if base and base[3] else "-"
        lines.append(f"| {label} | {proto} | {rps:.0f} | {ratio_rps} | {us:.1f} | {ratio_cpu} "
                     f"| {client:.1f} | {failed} | {', '.join(map(str, each))} |")
    lines += ["", *verdict(runs)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        path = args.out / f"h2_load-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
