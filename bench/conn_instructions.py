"""Instructions per new TLS connection (and per keep-alive request) of one
real zion worker, and of the floor's process (bench/floor_server.py), under
valgrind callgrind: counts that do not move with the machine's load the way
CPU time does (bench/conn_cost.py measures that).

Each server runs twice under callgrind, one worker, the bench's certificate
and app: one life serves N1 connections, the other N2; the difference of
the serving process's totals over N2 - N1 is one connection's cost without
start-up. User space only: the kernel's TCP work is not in it. Each
connection is what `wrk -H 'Connection: close'` makes in the throughput
scenario's B runs: a TLS 1.3 handshake offering the last session ticket
(so resumed after the first), one GET, the answer, the close.
`--shape keepalive` sends N requests over one connection instead.

    .venv/bin/python bench/conn_instructions.py [--servers zion,floor]
        [--shape new|keepalive] [--n1 100] [--n2 400] [--keep DIR] [--zion-tree DIR]

No lock: callgrind counts are the same however busy the machine is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from tls_setup import client_context, make_cert, pin_clients_to_x25519  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n\r\n"
CLOSING = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nConnection: close\r\n\r\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600  # imports under valgrind take a while
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not listen")


def _read_response(tls: ssl.SSLSocket, buf: bytes) -> bytes:
    """One response (content-length framed, as bench/app.py and the floor
    answer); what follows it."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            found = re.search(rb"content-length: *(\d+)", buf[:end], re.I)
            total = end + 4 + (int(found.group(1)) if found else 0)
            if len(buf) >= total:
                assert buf.startswith(b"HTTP/1.1 200"), buf[:100]
                return buf[total:]
        chunk = tls.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the response")
        buf += chunk


def _connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port))
    return ctx.wrap_socket(sock, server_hostname="localhost", session=session)


def _new_connections(port: int, n: int) -> None:
    ctx = client_context()
    ctx.set_alpn_protocols(["http/1.1"])
    session = None
    for _ in range(n):
        with _connect(port, ctx, session) as tls:
            tls.sendall(CLOSING)
            _read_response(tls, b"")
            while tls.recv(65536):  # the server closes: read to EOF
                pass
            session = tls.session or session


def _keepalive(port: int, n: int) -> None:
    ctx = client_context()
    ctx.set_alpn_protocols(["http/1.1"])
    with _connect(port, ctx, None) as tls:
        buf = b""
        for _ in range(n):
            tls.sendall(REQUEST)
            buf = _read_response(tls, buf)


def _argv(server: str, port: int, cert: Path, key: Path) -> list[str]:
    if server == "zion":
        return [sys.executable, "-m", "zion", "serve", "app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--ssl-certfile", str(cert),
                "--ssl-keyfile", str(key), "--log-level", "warning", "--no-bpf-demux"]
    return [sys.executable, str(BENCH / "floor_server.py"), "--port", str(port),
            "--workers", "1", "--cert", str(cert), "--key", str(key)]


KEEP: Path | None = None  # --keep: leave the serving process's callgrind file here
ZION_TREE = REPO  # --zion-tree: another checkout's zion package (a before/after)


def _life(server: str, shape: str, n: int) -> int:
    """One server life under callgrind serving `n`: the instruction total of
    the process that served (the worker; for the floor, its forked child)."""
    cert, key = make_cert()
    port = _free_port()
    outdir = Path(tempfile.mkdtemp(prefix="zion-conn-cg-"))
    state = tempfile.mkdtemp(prefix="zion-conn-state-")
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{ZION_TREE}",
           # Random string hashes move a life's count by up to ~1k instructions
           # per connection between runs of the same code (dict and set
           # layouts): fixed, two runs agree, and a cut of that size shows.
           "PYTHONHASHSEED": "0",
           "ZION_TLS_STATE_DIR": state, "ZION_SUPERVISOR_BOOT_TIMEOUT": "600",
           # A worker with work in hand beats every 5 ms: under callgrind a
           # request takes ~50x its wall time, so those beats (and the
           # timers behind them) would add several thousand instructions to
           # every request and move with the machine's load; at full speed
           # they are ~0.05 % of a worker's CPU. Slow them down here.
           "ZION_DEMUX_HEARTBEAT_INTERVAL_MS": "2000", "ZION_DEMUX_STALL_THRESHOLD_MS": "10000"}
    proc = subprocess.Popen(["valgrind", "--tool=callgrind",
                             f"--callgrind-out-file={outdir}/cg.%p",
                             *_argv(server, port, cert, key)],
                            cwd=BENCH, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_listening(port, proc)
        # The probe above was one connection without TLS: the same in both lives.
        (_new_connections if shape == "new" else _keepalive)(port, n)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
    try:
        totals = {}
        for path in outdir.glob("cg.*"):
            found = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.M)
            if found:
                totals[int(path.name[3:])] = int(found.group(1))
        # The serving process is the one forked from the process started
        # (valgrind runs the program in it): zion's worker, the floor's child.
        print(f"  {server} {shape} {n}: {totals} (started {proc.pid})", file=sys.stderr)
        children = {p: t for p, t in totals.items() if p != proc.pid}
        pid = max(children, key=children.__getitem__)
        if KEEP is not None:
            KEEP.mkdir(parents=True, exist_ok=True)
            shutil.copy(outdir / f"cg.{pid}", KEEP / f"{server}-{shape}-{n}.cg")
        return totals[pid]
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    pin_clients_to_x25519()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="zion,floor")
    parser.add_argument("--shape", choices=("new", "keepalive"), default="new")
    parser.add_argument("--n1", type=int, default=100)
    parser.add_argument("--n2", type=int, default=400)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each life's callgrind file there (callgrind_annotate)")
    parser.add_argument("--zion-tree", type=Path, default=REPO,
                        help="run this checkout's zion package (e.g. a worktree of main)")
    args = parser.parse_args()
    global KEEP, ZION_TREE
    KEEP, ZION_TREE = args.keep, args.zion_tree.resolve()
    unit = "connection" if args.shape == "new" else "keep-alive request"
    rows = {}
    for server in args.servers.split(","):
        low = _life(server, args.shape, args.n1)
        high = _life(server, args.shape, args.n2)
        rows[server] = (high - low) / (args.n2 - args.n1)
        print(f"{server}: {rows[server]:,.0f} instructions per {unit}", flush=True)
    if "floor" in rows and "zion" in rows:
        print(f"zion / floor: {rows['zion'] / rows['floor']:.3f}; zion's own: "
              f"{rows['zion'] - rows['floor']:,.0f} per {unit}")


if __name__ == "__main__":
    main()
