"""The servers under test, started the same way: same app, same certificate,
2 workers (4 for the stall scenario), HTTPS on loopback, access logs off.
Every non-default setting is listed in NON_DEFAULTS and lands in the report."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tls_setup import client_context

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
VENV = WORK / "venv"

NON_DEFAULTS = {
    "uvicorn": "--no-access-log (uvicorn logs every request by default); --loop uvloop "
               "--http httptools (explicit, same as auto here)",
    "nginx": "keepalive_requests 100000000 (default 1000 would re-handshake every 1000 "
             "requests); ssl_protocols TLSv1.2 TLSv1.3 (1.22 defaults to TLS 1.2 only); "
             "access_log off; sendfile on (files, plain HTTP; off by default)",
    "zion": "--log-level warning (as every Python server here)",
    "zion-h3": "--http3 (HTTP/3 on the TCP port's number; off by default)",
    "hypercorn-h3": "--quic-bind 127.0.0.1:PORT (HTTP/3 on the TCP port's number; hypercorn "
                    "needs the [h3] extra, aioquic); one worker: with more, packets of one "
                    "connection reach another worker (pgjones/hypercorn#114)",
}


@dataclass
class Ctx:
    cert: Path
    key: Path
    workers: int = 2
    app: str = "app:app"
    plain: bool = False  # plain HTTP/1.1: no certificate flags (zion: --no-tls)


@dataclass
class ServerDef:
    name: str
    family: str  # zion | uvicorn | gunicorn | granian | hypercorn | nginx | floor
    extra: list[str] = field(default_factory=list)
    reload_signal: int | None = None

    def argv(self, ctx: Ctx, port: int) -> list[str]:
        values = {"bin": str(VENV / "bin"), "bench": str(BENCH), "app": ctx.app,
                  "port": str(port), "workers": str(ctx.workers), "cert": str(ctx.cert),
                  "key": str(ctx.key)}
        if self.family == "nginx":
            conf = nginx_conf(ctx, port)
            values.update(conf=str(conf), prefix=str(conf.parent))
        out: list[str] = []
        for token in ARGV[self.family]:
            out += self._zion_head() if token == "{zion}" else [token.format(**values)]
        if ctx.plain:
            out = _without_tls(out) + (["--no-tls"] if self.family == "zion" else [])
        return [*out, *(token.format(**values) for token in self.extra)]

    def _zion_head(self) -> list[str]:
        # zion-before: the same venv running another checkout's zion package.
        src = os.environ.get("ZION_BENCH_BEFORE") if self.name == "zion-before" else None
        if src:
            return ["env", f"PYTHONPATH={src}", str(REPO / ".venv/bin/python"), "-m", "zion"]
        return [str(REPO / ".venv/bin/zion")]


_TLS_FLAGS = ("--ssl-certfile", "--ssl-keyfile", "--ssl-certificate", "--keyfile", "--certfile")


def _without_tls(argv: list[str]) -> list[str]:
    """An argv with its certificate flags (and their values) taken out."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _TLS_FLAGS:
            skip = True
        else:
            out.append(token)
    return out


# How each family is started: one command line per family, the same workers,
# certificate and app for all ({zion} is zion's own venv, or zion-before's).
ARGV: dict[str, tuple[str, ...]] = {
    "zion": ("{zion}", "serve", "{app}", "--host", "127.0.0.1", "--port", "{port}",
             "--workers", "{workers}", "--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}",
             "--log-level", "warning"),
    "uvicorn": ("{bin}/uvicorn", "{app}", "--host", "127.0.0.1", "--port", "{port}",
                "--workers", "{workers}", "--loop", "uvloop", "--http", "httptools",
                "--ssl-keyfile", "{key}", "--ssl-certfile", "{cert}", "--no-access-log",
                "--log-level", "warning"),
    "gunicorn": ("{bin}/gunicorn", "{app}", "-k", "uvicorn_worker.UvicornWorker",
                 "-w", "{workers}", "-b", "127.0.0.1:{port}", "--keyfile", "{key}",
                 "--certfile", "{cert}", "--log-level", "warning"),
    "granian": ("{bin}/granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", "{port}", "--workers", "{workers}", "--ssl-keyfile", "{key}",
                "--ssl-certificate", "{cert}", "--log-level", "warning", "{app}"),
    "hypercorn": ("{bin}/hypercorn", "{app}", "-b", "127.0.0.1:{port}", "-w", "{workers}",
                  "-k", "uvloop", "--keyfile", "{key}", "--certfile", "{cert}",
                  "--log-level", "warning"),
    "floor": ("{bin}/python", "{bench}/floor_server.py", "--port", "{port}",
              "--workers", "{workers}", "--cert", "{cert}", "--key", "{key}"),
    "nginx": ("/usr/sbin/nginx", "-p", "{prefix}", "-c", "{conf}"),
}


SERVERS = [
    ServerDef("zion", "zion", reload_signal=signal.SIGHUP),
    # Only with ZION_BENCH_BEFORE=<a checkout of an earlier commit>: before/after.
    *([ServerDef("zion-before", "zion", reload_signal=signal.SIGHUP)]
      if os.environ.get("ZION_BENCH_BEFORE") else []),
    ServerDef("zion-hash", "zion", ["--demux", "hash"], reload_signal=signal.SIGHUP),
    ServerDef("zion-nodemux", "zion", ["--no-bpf-demux"], reload_signal=signal.SIGHUP),
    ServerDef("uvicorn", "uvicorn", reload_signal=signal.SIGHUP),
    # WebSocket scenario only: uvicorn's other WebSocket implementation.
    ServerDef("uvicorn-wsproto", "uvicorn", ["--ws", "wsproto"], reload_signal=signal.SIGHUP),
    ServerDef("gunicorn-uvicorn", "gunicorn", reload_signal=signal.SIGHUP),
    ServerDef("granian", "granian"),
    ServerDef("hypercorn", "hypercorn"),
    # HTTP/3 scenario only (one worker): the same app over QUIC, both on aioquic.
    ServerDef("zion-h3", "zion", ["--http3"], reload_signal=signal.SIGHUP),
    ServerDef("hypercorn-h3", "hypercorn", ["--quic-bind", "127.0.0.1:{port}"]),
    ServerDef("nginx", "nginx", reload_signal=signal.SIGHUP),
    # The floor (bench/floor_server.py): bare uvloop TLS, constant answer, no ASGI.
    ServerDef("uvloop-floor", "floor"),
]


def nginx_conf(ctx: Ctx, port: int) -> Path:
    base = WORK / "nginx" / str(port)
    (base / "tmp").mkdir(parents=True, exist_ok=True)
    conf = base / "nginx.conf"
    conf.write_text(f"""
worker_processes {ctx.workers};
daemon off;
master_process on;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    sendfile on;
    client_body_temp_path {base}/tmp;
    proxy_temp_path {base}/tmp;
    fastcgi_temp_path {base}/tmp;
    uwsgi_temp_path {base}/tmp;
    scgi_temp_path {base}/tmp;
    server {{
        listen 127.0.0.1:{port}{"" if ctx.plain else " ssl"} reuseport;
        ssl_certificate {ctx.cert};
        ssl_certificate_key {ctx.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200 "Hello, world!"; }}
        location /file/ {{ alias {WORK / "files"}/; }}
    }}
}}
""")
    return conf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int, plain: bool = False) -> bool:
    request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            if plain:
                raw.sendall(request)
                return raw.recv(64).startswith(b"HTTP/1.1 200")
            with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)
                return tls.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Running:
    def __init__(self, sdef: ServerDef, ctx: Ctx, logdir: Path) -> None:
        self.sdef = sdef
        self.ctx = ctx
        self.port = free_port()
        logdir.mkdir(parents=True, exist_ok=True)
        self.log = open(logdir / f"{sdef.name}-{self.port}.log", "wb")  # noqa: SIM115
        self.argv = sdef.argv(ctx, self.port)
        self.proc = subprocess.Popen(self.argv, cwd=BENCH, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not answers(self.port, ctx.plain):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{sdef.name} did not start; see {self.log.name}")
            time.sleep(0.05)
        # Ready means every worker is up, not just the first one to answer.
        while len(self.workers()) < ctx.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the last worker finish its own start-up

    def tree(self) -> list[int]:
        """Every process in the server's session (master, workers, helpers)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[3]) == self.proc.pid:  # session id
                pids.append(int(entry))
        return pids

    def workers(self) -> list[int]:
        return [p for p in self.tree() if p != self.proc.pid and _ppid(p) == self.proc.pid]

    def cpu_seconds(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / tick

    def memory_mib(self) -> dict[str, tuple[float, float]]:
        """(RSS, PSS) per process. PSS splits pages shared after fork (the
        interpreter, libbcc in zion's case) among the processes sharing them."""
        out = {}
        for pid in self.tree():
            fields = {}
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    parts = line.split()
                    if parts and parts[0] in ("Rss:", "Pss:"):
                        fields[parts[0]] = int(parts[1]) / 1024
            except OSError:
                continue
            out[str(pid)] = (fields.get("Rss:", 0.0), fields.get("Pss:", 0.0))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the session
        self.log.close()


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rfind(")") + 2:].split()[1])
