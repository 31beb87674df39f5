"""The `zion` command. The only place that turns errors into exit codes.

Exit codes (zion.errors.ExitCode): 0 ok; 1 runtime failure (e.g. cannot bind);
2 bad configuration, certificate or key; 3 a worker can never start (the app
does not import, its lifespan startup fails, or it crash-loops before
becoming ready).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NoReturn

from zion import __version__, log, privileges
from zion.errors import ConfigError, ExitCode, ZionError
from zion.settings import Declared, DemuxMode, Settings, declared, load_settings, worker_count

DESCRIPTION = """\
zion: an asyncio HTTPS server for Python (ASGI) apps. The master binds one
SO_REUSEPORT listener per worker and attaches an eBPF program that steers each
new connection away from stalled, draining or overloaded workers; without the
privilege for it, the kernel's reuseport hash is used instead.
"""

SERVE_EPILOG = """\
configuration, lowest precedence first: the defaults (config/zion.toml lists
them), --config FILE, ZION_<SECTION>_<KEY> environment variables, then these
flags. --no-bpf-demux skips the demux: the kernel's reuseport hash is used.
Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads code and configuration
with no downtime.

examples:
  zion serve                              the default page on https://127.0.0.1:8443/
  zion serve myapp:app --workers 4        an ASGI app (Starlette, FastAPI, ...)
  zion serve --root ./public --port 9443  static files
  zion serve myapp:app --no-tls --port 8000
                                          plain HTTP behind a TLS-terminating proxy
  zion serve myapp:app --proxy-protocol v2 --proxy-allow-ips 10.0.0.5
                                          behind HAProxy send-proxy-v2 at 10.0.0.5
"""


# uvicorn options with no zion counterpart: what zion does instead, in the
# one error line (argparse alone says "unrecognized arguments: httptools").
UVICORN_ONLY = {
    "--http": "zion parses HTTP/1.1 with httptools and speaks HTTP/2 (h2) when ALPN "
              "picks it; drop --http (--no-http2 turns HTTP/2 off)",
    "--loop": "zion always runs uvloop; drop --loop",
    "--ws": "zion's WebSocket is built in (the websockets library's sans-I/O protocol); "
            "drop --ws (--ws-max-size, --ws-max-queue, --ws-ping-interval tune it)",
    "--interface": "zion tells ASGI 3 from ASGI 2 apps itself and serves no WSGI (wrap a "
                   "WSGI app in a2wsgi's WSGIMiddleware); drop --interface",
}

# The log format asked for on the command line or in the environment, for
# errors that come before the configuration is read (argparse's own, a bad
# config file): with json, they are JSON lines too.
_early_format = "logfmt"


def _format_from(argv: Sequence[str]) -> str:
    fmt = os.environ.get("ZION_LOG_FORMAT", "logfmt").strip().lower()
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.partition("=")[2]
    return fmt


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line (argparse prints the usage first), JSON with --log-format json."""
        log.early_error(_early_format, "usage_error", f"{message} (see {self.prog} --help)")
        sys.exit(ExitCode.CONFIG)


class _UvicornOnly(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = f"{option_string} {values}" if values else str(option_string)
        parser.error(f"{given}: {UVICORN_ONLY[str(option_string)]}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zion", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the server", description="Run the HTTPS server.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", metavar="FILE", help="a TOML file overriding the defaults")
    serve.add_argument("--env-file", metavar="FILE",
                       help="KEY=VALUE lines put into the environment first (ZION_* settings "
                       "and the app's own variables; the real environment wins)")
    _add_setting_flags(serve)
    for option in UVICORN_ONLY:
        serve.add_argument(option, nargs="?", action=_UvicornOnly, help=argparse.SUPPRESS)

    doctor = sub.add_parser(
        "doctor", help="check whether the eBPF demux can load here, and how to fix it",
        description="Check demux readiness with real probes (capabilities, bcc, kernel "
        "headers, a trial load and attach) and print the fix for each problem. "
        "Exit 0 when ready.")
    doctor.add_argument("--config", metavar="FILE", help="a TOML file overriding the defaults")
    doctor.add_argument("--workers", type=int, help="workers to compile the program for")
    doctor.add_argument("--demux", choices=[m.value for m in DemuxMode],
                        help="demux policy to compile")
    doctor.add_argument("--ebpf", action="store_true",
                        help="print the exact program text that was compiled")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--url", metavar="URL",
                        help="also show a running server's per-worker state, e.g. "
                        "https://127.0.0.1:8443 (its /_zion/status, loopback only)")
    return parser


_GROUPS = {"server": "application and network", "tls": "TLS", "log": "logging",
           "demux": "eBPF demux", "websocket": "WebSocket",
           "admin": "admin listener and load balancer agent"}


def _dest(d: Declared) -> str:
    return f"{d.section}__{d.name}"


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting that declares one (zion/settings.py): the help is
    the declaration's, with its default."""
    groups: dict[str, Any] = {}
    for d in declared():
        if d.flag is None:
            continue
        title = _GROUPS.get(d.section, d.section)
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        default = ("on" if d.default else "off") if d.type is bool else (
            f"{d.default}" if d.default != "" else "none")
        # argparse %-formats help strings (for %(default)s): a literal % is %%.
        text = f"{d.help} (default: {default}; [{d.section}] {d.name})".replace("%", "%%")
        if d.flag.name == "app":
            group.add_argument("app", nargs="?", metavar="APP", help=text, default=None,
                               type=str)
            continue
        kwargs: dict[str, Any] = {"dest": _dest(d), "default": None, "help": text}
        if d.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif d.flag.repeat is not None:
            kwargs.update(action="append", metavar=d.flag.metavar)
        elif isinstance(d.type, type) and issubclass(d.type, StrEnum):
            kwargs["choices"] = [m.value for m in d.type]
        else:
            kwargs["metavar"] = d.flag.metavar or d.name.upper()
        group.add_argument(d.flag.name, *d.flag.aliases, **kwargs)


def _cli_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags given, as settings: {section: {key: value}} (values are
    validated with everything else in load_settings)."""
    out: dict[str, dict[str, Any]] = {}
    for d in declared():
        if d.flag is None:
            continue
        value = args.app if d.flag.name == "app" else getattr(args, _dest(d))
        if value is None:
            continue
        if d.flag.repeat is not None:
            value = d.flag.repeat.join(value)
        out.setdefault(d.section, {})[d.name] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    global _early_format
    _early_format = _format_from(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "doctor":
        return _doctor(args)
    parser.print_help()
    return ExitCode.CONFIG


def _load(args: argparse.Namespace, cli: dict[str, dict[str, Any]]) -> Settings:
    return load_settings(args.config, cli)


def _serve(args: argparse.Namespace) -> int:
    from zion.supervisor import master

    cli = _cli_overrides(args)
    if args.env_file:
        if not os.path.isfile(args.env_file):
            log.early_error(_early_format, "config_error",
                            f"config error: --env-file {args.env_file}: no such file")
            return ExitCode.CONFIG
        from dotenv import load_dotenv

        load_dotenv(args.env_file, override=False)
    try:
        settings = _load(args, cli)
        log.configure(settings.log.format, settings.log.level, log_config=settings.log.config)
    except ConfigError as exc:
        log.early_error(_early_format, "config_error", f"config error: {exc}")
        return exc.exit_code
    logger = log.get_logger("zion")
    privileges.protect_master()
    try:
        return master.serve(settings, lambda: _load(args, cli))
    except ZionError as exc:
        logger.error("fatal", error=str(exc), kind=type(exc).__name__, exit_code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


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
        return ExitCode.FAILURE
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
    from zion.demux import readiness

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
                          "object": report.origin,
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
        if report.origin:
            print(f"  object:        {report.origin}")
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
    return ExitCode.OK if report.state is readiness.DemuxReadiness.READY else ExitCode.FAILURE
