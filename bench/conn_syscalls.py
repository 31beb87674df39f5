"""System calls per new TLS connection, zion against the floor
(bench/floor_server.py), by process and by call: `strace -c` attached to
every process of each server's tree while `wrk -H 'Connection: close'` runs
(the throughput scenario's B runs). strace slows the servers many times over,
so only the counts mean something, not the times or the rates.

    bench/.work/venv/bin/python bench/conn_syscalls.py [--servers zion,uvloop-floor]
        [--workers 1] [--seconds 3] [--conns 8]

Prints, per server and process (master, worker), calls per connection of
every system call made at least 0.05 times per connection.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
from servers import SERVERS, WORK, Ctx, Running
from tls_setup import make_cert, pin_clients_to_x25519


def _parse(path: Path) -> dict[str, int]:
    """strace -c's table: syscall name -> calls."""
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def measure(run: Running, conns: int, seconds: float) -> tuple[int, dict[str, dict[str, int]]]:
    out = Path(tempfile.mkdtemp(prefix="zion-conn-strace-"))
    tracers = []
    for pid in run.tree():
        role = "master" if pid == run.proc.pid else "worker"
        f = out / f"{role}-{pid}.txt"
        tracers.append((role, f, subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(f), "-p", str(pid)],
            stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # attached
    res = load.wrk(run.port, conns, seconds, close=True)
    for _, _, tracer in tracers:
        tracer.send_signal(signal.SIGINT)
    by_role: dict[str, dict[str, int]] = {}
    for role, f, tracer in tracers:
        tracer.wait(30)
        # A master with several workers: the workers' counts are summed.
        into = by_role.setdefault(role, {})
        for name, n in _parse(f).items():
            into[name] = into.get(name, 0) + n
    return res["requests"], by_role


def main() -> int:
    pin_clients_to_x25519()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="zion,uvloop-floor")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--conns", type=int, default=8)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("strace -p needs root (or ptrace rights over the servers)", file=sys.stderr)
    cert, key = make_cert()
    ctx = Ctx(cert, key, workers=a.workers)
    for sdef in [s for s in SERVERS if s.name in a.servers.split(",")]:
        run = Running(sdef, ctx, WORK / "logs")
        try:
            load.wrk(run.port, a.conns, 1, close=True)  # warm-up
            n, by_role = measure(run, a.conns, a.seconds)
        finally:
            run.stop()
        print(f"{sdef.name}: {n} connections")
        for role, calls in sorted(by_role.items()):
            total = sum(calls.values()) / max(n, 1)
            shown = ", ".join(f"{name} {c / n:.2f}" for name, c in
                              sorted(calls.items(), key=lambda kv: -kv[1]) if c / n >= 0.05)
            print(f"  {role}: {total:.2f} per connection: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
