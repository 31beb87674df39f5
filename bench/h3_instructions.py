"""Instructions per request of one real zion worker (valgrind callgrind),
HTTP/3 against HTTP/2 on the same worker: instruction counts do not move
with the machine's load the way CPU time does.

Starts `zion serve app:app --workers 1 --http3 --no-bpf-demux` under
callgrind (the worker is a fork of the master, so it runs under it too;
callgrind_control cannot reach a forked child, so each run is a server's
whole life): one run sends N1 requests of every client shape, and one more
run per shape sends N2 of that shape and N1 of the others. The difference
of the worker's totals over N2 - N1 is one request's cost without start-up
or the connections' handshakes. User-space only: the kernel's UDP and TCP
work (sendto, recvfrom) is not in it.

Clients: h2load (HTTP/2, C, -m streams per connection), aioquic's HTTP/3
client sending each request in its own transmission, and the same client
coalescing the requests its streams issue in one loop iteration (as h2load
writes its streams' requests together): bench/h3_server.py's client.

    .venv/bin/python bench/h3_instructions.py   # takes /work/wt/bench.lock per run
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import h3_server  # noqa: E402  (bench/ is not a package)


def _worker_ir(outdir: Path, pid: int) -> int:
    path = outdir / f"cg.{pid}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if path.exists():
            found = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.5)
    raise RuntimeError(f"no callgrind totals in {path}")


def _run(counts: dict[str, int], args: argparse.Namespace) -> int:
    """One server life under callgrind; the worker's instruction total.
    Each life holds the team's benchmark lock alone (a couple of minutes),
    so other benchmarks can run between them."""
    with open(args.lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _life(counts, args)


def _life(counts: dict[str, int], args: argparse.Namespace) -> int:
    port = h3_server._free_port()
    state = tempfile.mkdtemp(prefix="zion-h3-cg-")
    outdir = Path(tempfile.mkdtemp(prefix="zion-h3-cg-out-"))
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{REPO}", "ZION_TLS_STATE_DIR": state,
           "ZION_SUPERVISOR_BOOT_TIMEOUT": "600"}
    server, worker = h3_server.start_zion(
        port, env, wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/cg.%p"),
        extra=("--no-bpf-demux",))
    try:
        for name, n in counts.items():
            if name == "h2":
                out = subprocess.run(["h2load", "-n", str(n), "-c", str(args.connections),
                                      "-m", str(args.streams), f"https://127.0.0.1:{port}/"],
                                     capture_output=True, text=True, timeout=900)
                assert f"{n} succeeded" in out.stdout, out.stdout[-500:]
            else:
                h3_server._Client.coalesce = name == "h3-batched"
                ok = asyncio.run(h3_server._h3(port, n, args.connections, args.streams))
                assert ok == n, ok
    finally:
        server.terminate()
        server.wait(300)
    try:
        return _worker_ir(outdir, worker)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


SHAPES = {"h2": "HTTP/2 (h2load)", "h3": "HTTP/3 (aioquic client, a transmission per request)",
          "h3-batched": "HTTP/3 (aioquic client, requests of one iteration coalesced)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=100)
    parser.add_argument("--n2", type=int, default=500)
    parser.add_argument("--lock", default="/work/wt/bench.lock")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=10)
    args = parser.parse_args()
    base = {shape: args.n1 for shape in SHAPES}
    base_ir = _run(base, args)
    rows = []
    for shape, name in SHAPES.items():
        ir = _run({**base, shape: args.n2}, args)
        rows.append((name, (ir - base_ir) / (args.n2 - args.n1)))
    print(f"load average {os.getloadavg()[0]:.2f}; N1={args.n1} N2={args.n2}, "
          f"{args.connections} connections x {args.streams} streams")
    print("| client | worker instructions per request |")
    print("|---|---|")
    for name, per in rows:
        print(f"| {name} | {per / 1000:.1f}k |")


if __name__ == "__main__":
    main()
