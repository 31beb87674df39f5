"""The `zion` command. The only place that turns errors into exit codes.

Exit codes: 0 ok; 1 runtime failure (e.g. cannot bind); 2 bad configuration,
certificate or key; 3 a worker can never start (the app does not import,
its lifespan startup fails, or it crash-loops before becoming ready).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from zion import __version__, log
from zion.config import (
    DEMUX_MODES,
    LIFESPAN_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    load_settings,
    worker_count,
)
from zion.errors import ConfigError, ZionError

DESCRIPTION = """\
zion: an asyncio HTTPS server for Python (ASGI) apps. The master binds one
SO_REUSEPORT listener per worker and attaches an eBPF program that steers each
new connection away from stalled, draining or overloaded workers; without the
privilege for it, the kernel's reuseport hash is used instead.
"""

SERVE_EPILOG = """\
configuration, lowest precedence first: the embedded default (config/zion.toml),
--config FILE, ZION_<SECTION>_<KEY> environment variables, then these flags.
Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads code and configuration
with no downtime.

examples:
  zion serve                              the default page on https://127.0.0.1:8443/
  zion serve myapp:app --workers 4        an ASGI app (Starlette, FastAPI, ...)
  zion serve --root ./public --port 9443  static files
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zion", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the server", description="Run the HTTPS server.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("app", nargs="?", metavar="APP",
                       help="ASGI application as module:attribute (default: none)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; '::' for IPv6)")
    serve.add_argument("--port", type=int, help="port to bind (default 8443; 0 = any free)")
    serve.add_argument("--workers", type=int,
                       help="worker processes, one listener each (default: CPU count)")
    serve.add_argument("--config", metavar="FILE", help="a TOML file overriding the defaults")
    serve.add_argument("--root", metavar="DIR", help="serve static files from DIR")
    serve.add_argument("--ssl-certfile", metavar="PEM",
                       help="certificate chain (default: a self-signed one, made once)")
    serve.add_argument("--ssl-keyfile", metavar="PEM", help="private key for --ssl-certfile")
    serve.add_argument("--no-bpf-demux", action="store_true",
                       help="do not load the eBPF demux; use the kernel's reuseport hash")
    serve.add_argument("--demux", choices=DEMUX_MODES,
                       help="demux policy (default least-loaded)")
    serve.add_argument("--log-format", choices=LOG_FORMATS, help="default logfmt")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None,
                       help="one log line per request (default off)")
    serve.add_argument("--factory", action="store_true", default=None,
                       help="APP is a callable with no arguments that returns the ASGI app")
    serve.add_argument("--app-dir", metavar="DIR",
                       help="put DIR first on sys.path before importing APP (default: cwd)")
    serve.add_argument("--lifespan", choices=LIFESPAN_MODES,
                       help="ASGI lifespan: auto (default), on (required), off")
    serve.add_argument("--reload", action="store_true", default=None,
                       help="development: reload workers with no downtime when a .py file "
                       "changes")
    serve.add_argument("--reload-dir", metavar="DIR", action="append", dest="reload_dirs",
                       help="directory to watch with --reload (repeatable; default: app dir)")
    serve.add_argument("--ws-max-size", type=int, metavar="BYTES",
                       help="largest WebSocket message (default 16777216)")
    serve.add_argument("--ws-ping-interval", type=float, metavar="S",
                       help="seconds between WebSocket keep-alive pings (default 20, 0 = none)")
    serve.add_argument("--ws-ping-timeout", type=float, metavar="S",
                       help="seconds a pong may take before the WebSocket closes (default 20)")
    serve.add_argument("--ws-per-message-deflate", action=argparse.BooleanOptionalAction,
                       default=None, help="offer permessage-deflate (default on)")

    doctor = sub.add_parser(
        "doctor", help="check whether the eBPF demux can load here, and how to fix it",
        description="Check demux readiness with real probes (capabilities, bcc, kernel "
        "headers, a trial load and attach) and print the fix for each problem. "
        "Exit 0 when ready.")
    doctor.add_argument("--config", metavar="FILE", help="a TOML file overriding the defaults")
    doctor.add_argument("--workers", type=int, help="workers to compile the program for")
    doctor.add_argument("--demux", choices=DEMUX_MODES, help="demux policy to compile")
    doctor.add_argument("--ebpf", action="store_true",
                        help="print the exact program text that was compiled")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--url", metavar="URL",
                        help="also show a running server's per-worker state, e.g. "
                        "https://127.0.0.1:8443 (its /_zion/status, loopback only)")
    return parser


def _cli_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server = {"app": args.app, "host": args.host, "port": args.port,
              "workers": args.workers, "root": args.root, "factory": args.factory,
              "app_dir": args.app_dir, "lifespan": args.lifespan, "reload": args.reload,
              "reload_dirs": os.pathsep.join(args.reload_dirs) if args.reload_dirs else None}
    websocket = {"max_size": args.ws_max_size, "ping_interval": args.ws_ping_interval,
                 "ping_timeout": args.ws_ping_timeout,
                 "per_message_deflate": args.ws_per_message_deflate}
    tls = {"certfile": args.ssl_certfile, "keyfile": args.ssl_keyfile}
    logs = {"format": args.log_format, "level": args.log_level, "access_log": args.access_log}
    demux: dict[str, Any] = {"mode": args.demux}
    if args.no_bpf_demux:
        demux["enabled"] = False
    out = {"server": server, "tls": tls, "log": logs, "demux": demux, "websocket": websocket}
    return {s: {k: v for k, v in vals.items() if v is not None} for s, vals in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "doctor":
        return _doctor(args)
    parser.print_help()
    return 2


def _load(args: argparse.Namespace, cli: dict[str, dict[str, Any]]) -> Settings:
    return load_settings(args.config, cli)


def _serve(args: argparse.Namespace) -> int:
    from zion import master

    cli = _cli_overrides(args)
    try:
        settings = _load(args, cli)
    except ConfigError as exc:
        print(f"zion: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.configure(settings.log.format, settings.log.level)
    logger = log.get_logger("zion")
    try:
        return master.serve(settings, lambda: _load(args, cli))
    except ZionError as exc:
        logger.error("fatal", error=str(exc), kind=type(exc).__name__, exit_code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _print_running(url: str, as_json: bool) -> int:
    import ssl
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # our own server on loopback, often self-signed
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/_zion/status", context=ctx,
                                    timeout=5) as resp:
            status = json.load(resp)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"zion: cannot read {url}/_zion/status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status))
        return 0
    demux = status["demux"]
    print(f"running server {url}: demux {demux['state']}"
          + (f" ({demux['mode']})" if demux.get("mode") else "")
          + (f", reason {demux['reason']}" if demux.get("reason") else "")
          + f", fallbacks to the kernel hash: {demux.get('fallbacks', 0)}")
    print(f"  {'worker':>6} {'pid':>8} {'state':<9} {'heartbeat ms':>12} {'conns':>6} "
          f"{'inflight':>8} {'backlog':>7} {'dispatches':>10}")
    for w in demux["workers"]:
        age = "-" if w["heartbeat_age_ms"] is None else f"{w['heartbeat_age_ms']:.1f}"
        print(f"  {w['worker']:>6} {w['pid']:>8} {w['state']:<9} {age:>12} "
              f"{w['connections']:>6} {w['inflight']:>8} {w['backlog']:>7} "
              f"{w['dispatches']:>10}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from zion import readiness

    cli: dict[str, dict[str, Any]] = {"server": {}, "demux": {}}
    if args.workers is not None:
        cli["server"]["workers"] = args.workers
    if args.demux:
        cli["demux"]["mode"] = args.demux
    try:
        settings = load_settings(args.config, cli)
    except ConfigError as exc:
        print(f"zion: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.configure("console", "warning")
    workers = min(worker_count(settings), 256)
    report = readiness.probe(settings, workers=workers)
    if args.json:
        print(json.dumps({"bpf_demux": report.state.value, "reason": report.reason,
                          "detail": report.detail, "errno": report.errno, "fix": report.fix,
                          "prog_id": report.prog_id, "capabilities": readiness.describe_caps(),
                          "mode": settings.demux.mode, "workers": workers}))
    else:
        print(f"bpf_demux: {report.state.value}")
        print(f"  detail:        {report.detail}")
        if report.reason and report.reason != report.state.value:
            print(f"  reason:        {report.reason}")
        if report.errno is not None:
            print(f"  errno:         {readiness.describe_errno(report.errno)}")
        print(f"  capabilities:  {readiness.describe_caps()}")
        print(f"  mode/workers:  {settings.demux.mode} / {workers}")
        if report.fix:
            print(f"  fix:           {report.fix}")
    if args.url:
        code = _print_running(args.url, args.json)
        if code:
            return code
    if args.ebpf:
        if report.program_text:
            print(report.program_text, end="" if report.program_text.endswith("\n") else "\n")
        else:
            print("(no program was compiled: the probe stopped before compiling)",
                  file=sys.stderr)
    return 0 if report.state is readiness.DemuxReadiness.READY else 1
