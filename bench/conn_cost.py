"""Server CPU per new TLS connection, zion against the bare uvloop floor,
interleaved, one worker each: a quick A/B for per-connection work.

    bench/.work/venv/bin/python bench/conn_cost.py [--rounds 5] [--seconds 5]
        [--servers zion,uvloop-floor] [--conns 16]

Prints, per server, the median over rounds of server CPU (whole process tree,
/proc) per connection while `wrk -H 'Connection: close'` runs, and its ratio
to the floor's in the same round (median [min-max] over rounds). CPU time,
not wall time: it moves less than throughput when other work shares the
cores, but cache and frequency effects remain, so compare servers within one
run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
from servers import SERVERS, WORK, Ctx, Running
from tls_setup import make_cert, pin_clients_to_x25519


def main() -> int:
    pin_clients_to_x25519()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--servers", default="zion,uvloop-floor")
    a = p.parse_args()
    cert, key = make_cert()
    ctx = Ctx(cert, key, workers=a.workers)
    chosen = [s for s in SERVERS if s.name in a.servers.split(",")]
    per_conn: dict[str, list[float]] = {s.name: [] for s in chosen}
    rps: dict[str, list[float]] = {s.name: [] for s in chosen}
    for r in range(a.rounds):
        # Each round starts with the next server: the first of a round is
        # not always the same one.
        for sdef in chosen[r % len(chosen):] + chosen[:r % len(chosen)]:
            run = Running(sdef, ctx, WORK / "logs")
            try:
                load.wrk(run.port, a.conns, 1, close=True)  # warm-up
                cpu0 = run.cpu_seconds()
                res = load.wrk(run.port, a.conns, a.seconds, close=True)
                cpu = run.cpu_seconds() - cpu0
            finally:
                run.stop()
            per_conn[sdef.name].append(cpu / max(res["requests"], 1) * 1e6)
            rps[sdef.name].append(res["rps"])
            print(f"round {r + 1}: {sdef.name} {per_conn[sdef.name][-1]:.0f} us/conn "
                  f"{res['rps']:.0f} conn/s", file=sys.stderr, flush=True)
    floor = per_conn.get("uvloop-floor")
    for name, values in per_conn.items():
        med = statistics.median(values)
        ratio = ""
        if floor:
            # Within each round (the servers ran back to back), then the
            # median [min-max]: other work on the machine moves the absolute
            # figures from round to round more than it moves these.
            rounds = [v / f for v, f in zip(values, floor, strict=True)]
            ratio = (f" {statistics.median(rounds):.2f}x floor "
                     f"[{min(rounds):.2f}-{max(rounds):.2f}]")
        print(f"{name:14} {med:6.0f} us/conn [{min(values):.0f}-{max(values):.0f}]"
              f" {statistics.median(rps[name]):7.0f} conn/s{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
