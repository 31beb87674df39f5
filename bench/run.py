"""zion side by side with uvicorn, gunicorn, granian, hypercorn, nginx and the
floor (bench/floor_server.py: bare uvloop + ssl, a constant answer).

    bench/run.sh --quick     zion, uvicorn and the floor, throughput only,
                             2 interleaved rounds of 3 s runs (under 3 minutes)
    bench/run.sh             every server and scenario, 3 interleaved rounds

--servers and --scenarios pick a subset (the scenarios are declared in
bench/scenarios.py). Method: rounds interleave the servers (A B C A B C ...),
each server starts fresh with a warm-up; medians with min-max; server CPU from
/proc over the whole process tree and the client's CPU from rusage, because
wrk shares the cores and can be the bottleneck. Ratios against the floor and
uvicorn are taken within each round, then the median: other work on the
machine moves absolute figures, much less the ratios of one round.

Results (out of git): bench/results/<stamp>-<mode>.json.gz (every raw figure
and command), <stamp>-<mode>.md and PNG plots, and latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from scenarios import BY_NAME, SCENARIOS, Scenario
from servers import NON_DEFAULTS, REPO, SERVERS, VENV, Ctx, ServerDef
from tls_setup import make_cert, pin_clients_to_x25519

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_SERVERS = ("zion", "uvicorn", "uvloop-floor")
QUICK_SCENARIOS = ("throughput",)


def run_scenario(scenario: Scenario, servers: list[ServerDef], ctx: Ctx, rounds: int,
                 quick: bool) -> dict:
    secs = scenario.seconds_for(quick)
    chosen = [s for s in servers if scenario.applies(s)]
    out: dict = {}
    for r in range(rounds if scenario.interleaved else 1):
        # Each round starts with the next server, so no server is always the
        # first after a change of server (an A/A run of bench/conn_cost.py
        # with a fixed order put the same zion 10 % apart: 570 against 519
        # us per connection; 543 against 549 with this rotation).
        for sdef in chosen[r % len(chosen):] + chosen[:r % len(chosen)]:
            where = f" {r + 1}/{rounds}" if scenario.interleaved else ""
            print(f"{scenario.name}{where}: {sdef.name}", file=sys.stderr, flush=True)
            try:
                res = scenario.measure(sdef, ctx, secs)
            except Exception as exc:
                if not scenario.may_fail:
                    raise
                res = {"unsupported": repr(exc)}
            if scenario.interleaved:
                out.setdefault(sdef.name, []).append(res)
            else:
                out[sdef.name] = res
    return out


def main() -> int:
    pin_clients_to_x25519()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_SERVERS)}; {', '.join(QUICK_SCENARIOS)}; "
                        "2 rounds of short runs")
    parser.add_argument("--servers", help="comma-separated subset, e.g. zion,uvicorn; "
                        f"of {','.join(s.name for s in SERVERS)}")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(BY_NAME)}")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (2 quick, 3 full)")
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
    rounds = args.rounds or (2 if quick else 3)
    names = args.servers.split(",") if args.servers else (QUICK_SERVERS if quick else None)
    wanted = args.scenarios.split(",") if args.scenarios else (
        QUICK_SCENARIOS if quick else tuple(BY_NAME))
    unknown = [n for n in names or () if n not in {s.name for s in SERVERS}]
    unknown += [n for n in wanted if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    servers = [s for s in SERVERS if names is None or s.name in names]
    cert, key = make_cert()
    started = time.time()
    results: dict = {}
    for scenario in SCENARIOS:
        if scenario.name in wanted:
            ctx = Ctx(cert, key, workers=scenario.workers, app=scenario.app,
                      plain=scenario.plain)
            results[scenario.name] = run_scenario(scenario, servers, ctx, rounds, quick)
    results.setdefault("throughput", {})
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    runs = [r for rs in results["throughput"].values() for r in rs]
    results["meta"] = {
        # The 1-minute load average after each throughput run: other work on
        # the machine shows up here (the bench itself keeps it near 2-3).
        "loadavg_1m": [round(r["loadavg_1m"], 2) for r in runs if "loadavg_1m" in r],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full", "rounds": rounds,
        "seconds_per_run": BY_NAME["throughput"].seconds_for(quick),
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
    print("\n".join(report.ratios_text(results)))
    print(f"wrote {out} and {md}", file=sys.stderr)
    return 0


def versions() -> dict:
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


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
