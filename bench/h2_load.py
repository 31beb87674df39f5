"""HTTP/2 throughput: h2load (nghttp2-client) against zion, granian and
hypercorn serving the same app (bench/app.py) with the same certificate and
2 workers, plus zion over HTTP/1.1 (h2load --h1) for the ratio the issue asks
for. Server CPU per request is the whole process tree's utime+stime over the
run, divided by the requests answered.

    .venv/bin/python bench/h2_load.py [--clients 16] [--out bench/results]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import make_cert
from servers import WORK, Ctx, Running, ServerDef

# (label, server, h2load protocol flags)
CASES = [
    ("zion HTTP/2", ServerDef("zion", "zion", ["--http2"]), []),
    ("zion HTTP/1.1", ServerDef("zion", "zion"), ["--h1"]),
    ("granian HTTP/2", ServerDef("granian", "granian"), []),
    ("hypercorn HTTP/2", ServerDef("hypercorn", "hypercorn"), []),
]


# h2load does not reconnect after a GOAWAY, and zion sends one after ~3800
# streams (zttp's limit, see zion/http/h2.py): every run stays under that.
PER_CONNECTION = 3500


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16, help="h2load -m (HTTP/2 only)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cert, key = make_cert()
    ctx = Ctx(cert, key)
    rows = []
    for label, sdef, extra in CASES:
        run = Running(sdef, ctx, WORK / "logs")
        try:
            streams = 1 if extra else args.streams
            h2load(run.port, args.clients * 500, args.clients, streams, extra)  # warm-up
            cpu0 = run.cpu_seconds()
            result = h2load(run.port, args.clients * PER_CONNECTION, args.clients, streams,
                            extra)
            cpu = run.cpu_seconds() - cpu0
        finally:
            run.stop()
        us = cpu / result["ok"] * 1e6 if result["ok"] else 0.0
        rows.append((label, result, us))
        print(label, result, f"{us:.1f} µs/req", flush=True)
    lines = [
        f"# HTTP/2 load ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"h2load -n {args.clients * PER_CONNECTION} -c {args.clients} -t 1, HTTP/2 with -m "
        f"{args.streams} streams per connection, HTTP/1.1 (--h1) one request at a time per "
        "connection; "
        "GET / of bench/app.py, 2 workers, loopback, the same certificate.", "",
        "| server | protocol | req/s | server CPU µs/req | failed |", "|---|---|---|---|---|",
    ]
    for label, r, us in rows:
        lines.append(f"| {label} | {r['protocol']} | {r['rps']:.0f} | {us:.1f} | {r['failed']} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        path = args.out / f"h2_load-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
