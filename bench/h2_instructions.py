"""Instructions per request (valgrind callgrind), HTTP/1.1 against HTTP/2, in
the shapes of bench/h2_exchange.py: zion's protocol, its Exchange and a
trivial app in-process, no sockets, no TLS. Instruction counts do not move
with the machine's load the way timings do (two CPUs shared by five people).

Each shape runs twice, with N1 and N2 requests; (Ir(N2) - Ir(N1)) / (N2 - N1)
is the cost of one request without start-up. PYTHONHASHSEED is fixed: with
random string hashes two runs of the same code differed by up to ~1k
instructions per request, as much as many a cut this tool is to prove. The
HTTP/2 client's frames are made by pure-Python `h2`, ~2.2M instructions a
request, so they are made before callgrind runs (bench/h2_exchange.py
client_frames, pickled); what loading them costs is measured the same way
(the "frames loaded" rows) and taken off. Until 2026-12-07 the client ran
under callgrind and its cost was taken off: 14 minutes a run, and a
difference of two ~2.3M figures.

    .venv/bin/python bench/h2_instructions.py [--uvloop] [--h1-only] [--out bench/results]

The loop is asyncio's by default (the figures in docs/benchmarks.md); its
call_soon, Handle and _run_once are Python code, about 22k instructions of
an HTTP/1.1 request. --uvloop runs the same shapes on uvloop, as zion's
workers do: closer to what a worker spends, lower by about that much.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
N1, N2 = 300, 2300


def _load(path: str) -> tuple[bytes, list[bytes]]:
    with open(path, "rb") as f:
        made: tuple[bytes, list[bytes]] = pickle.load(f)
    return made


def _child(shape: str, n: int, loop: str, frames: str) -> None:
    sys.path.insert(0, str(BENCH))
    import h2_exchange

    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    h2_exchange.N = n
    if shape == "h1":
        asyncio.run(h2_exchange._h1())
    elif shape == "h2":
        asyncio.run(h2_exchange._h2(1, _load(frames)))
    elif shape == "h2x16":
        asyncio.run(h2_exchange._h2(16, _load(frames)))
    else:  # "load", "load16": the frames alone, taken off the h2 shapes
        _load(frames)


def _frames_file(shape: str, n: int) -> str:
    """The client's frames for `shape`, made outside callgrind."""
    if shape == "h1":
        return ""
    sys.path.insert(0, str(BENCH))
    import h2_exchange

    batch = 16 if shape.endswith("16") else 1
    path = Path(FRAMES) / f"{batch}-{n}.pickle"
    if not path.exists():
        with open(path, "wb") as f:
            pickle.dump(h2_exchange.client_frames(n, batch), f)
    return str(path)


LOOP = "asyncio"
FRAMES = ""  # a temporary directory for the pickled client frames


def _instructions(shape: str, n: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", shape, str(n), LOOP, _frames_file(shape, n)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"}).stderr
    found = re.search(r"Collected : (\d+)", out)
    if not found:
        raise RuntimeError(f"no instruction count from callgrind:\n{out[-2000:]}")
    return int(found.group(1))


def per_request(shape: str) -> float:
    return (_instructions(shape, N2) - _instructions(shape, N1)) / (N2 - N1)


def main() -> None:
    global LOOP, FRAMES
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--uvloop", action="store_true", help="run the shapes on uvloop")
    parser.add_argument("--h1-only", action="store_true",
                        help="HTTP/1.1 keep-alive alone, the median of 3 (before/after a cut)")
    args = parser.parse_args()
    if args.uvloop:
        LOOP = "uvloop"
    if args.h1_only:
        with ThreadPoolExecutor(2) as pool:
            runs = sorted(pool.map(per_request, ["h1"] * 3))
        print(f"HTTP/1.1 keep-alive, {LOOP}: {runs[1]:,.0f} instructions / request "
              f"(median of 3: {', '.join(f'{r:,.0f}' for r in runs)})")
        return
    shapes = ["h1", "h2", "load", "h2x16", "load16"]
    with tempfile.TemporaryDirectory() as FRAMES:
        for shape in shapes[1:]:
            for n in (N1, N2):
                _frames_file(shape, n)
        with ThreadPoolExecutor(2) as pool:
            ir = dict(zip(shapes, pool.map(per_request, shapes), strict=True))
    h1 = ir["h1"]
    h2_one = ir["h2"] - ir["load"]
    h2_many = ir["h2x16"] - ir["load16"]
    lines = [
        f"# Instructions per request, in-process ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"valgrind callgrind, (Ir({N2}) - Ir({N1})) / {N2 - N1}; bench/h2_instructions.py. "
        f"GET with two headers, a 12-byte answer from a trivial ASGI app; {LOOP} loop, "
        "no sockets, no TLS.", "",
        "| path | instructions / request | vs HTTP/1.1 |", "|---|---|---|",
        f"| HTTP/1.1 keep-alive | {h1:,.0f} | 1.00 |",
        f"| HTTP/2, one stream at a time | {h2_one:,.0f} | {h2_one / h1:.2f} |",
        f"| HTTP/2, 16 streams per read | {h2_many:,.0f} | {h2_many / h1:.2f} |",
        f"| (frames loaded, taken off: 1 / 16 per read) | {ir['load']:,.0f} / "
        f"{ir['load16']:,.0f} | |",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        path = args.out / f"h2_instructions-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
