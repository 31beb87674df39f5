"""Configuration: every setting declared once, parsed once, in the master,
into one frozen `Settings`.

A declaration (`setting(...)` on a section dataclass field) carries the
default, the help text, the range check and the command-line flag. From it
come: TOML validation, the ZION_<SECTION>_<KEY> environment, the flags of
`zion serve`, and config/zion.toml (tests/test_settings.py checks the file
is exactly `render_default_toml()`).

Precedence, lowest first: the declared defaults <- a file given with
--config <- ZION_<SECTION>_<KEY> environment <- command-line flags. Every
value is validated here, so workers never see a bad one; an error names the
key, where the value came from, and what is wrong, in one line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from zion.errors import ConfigError

Check = Callable[[Any], str | None]


class DemuxMode(StrEnum):
    LEAST_LOADED = "least-loaded"
    HASH = "hash"
    CPU = "cpu"


class LogFormat(StrEnum):
    LOGFMT = "logfmt"
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class CertReqs(StrEnum):
    """Client certificates: uvicorn's --ssl-cert-reqs 0/1/2 by name."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class LifespanMode(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class ProxyProtocol(StrEnum):
    """Which PROXY protocol header every connection must start with."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"
    AUTO = "auto"  # v1 or v2, told apart by the first byte


class TLSVersion(StrEnum):
    V1_2 = "1.2"
    V1_3 = "1.3"


@dataclass(frozen=True)
class Flag:
    """How a setting appears on `zion serve`'s command line."""

    name: str  # "--port"; "app" for the positional APP
    metavar: str | None = None
    repeat: str | None = None  # repeatable; the values joined with this separator
    aliases: tuple[str, ...] = ()  # uvicorn's name for the same thing


def setting(default: Any, help: str, *, check: Check | None = None,
            flag: Flag | str | None = None) -> Any:
    if isinstance(flag, str):
        flag = Flag(flag)
    return field(default=default, metadata={"help": help, "check": check, "flag": flag})


def _ip_list(v: Any) -> str | None:
    import ipaddress

    for entry in str(v).split(","):
        entry = entry.strip()
        if entry and entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                return f"has {entry!r}, which is not an address or a network"
    return None


def parse_host_port(text: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[V6]:PORT" -> (host, port); ValueError says what is wrong."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host:
        raise ValueError("must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets: [::1]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("needs a port between 0 and 65535")
    return host, int(port)


def _host_port_or_off(v: Any) -> str | None:
    if not v:
        return None
    try:
        parse_host_port(str(v))
    except ValueError as exc:
        return str(exc)
    return None


def _header_lines(v: Any) -> str | None:
    for line in str(v).splitlines():
        name, colon, _value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip() or "\r" in line:
            return f"has {line!r}; each header must be NAME: VALUE"
    return None


def _access_log_format(v: Any) -> str | None:
    from zion.http.access_log import check_format

    return check_format(str(v))


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def between(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


@dataclass(frozen=True, slots=True)
class ServerSettings:
    app: str = setting("", 'ASGI application as "module:attribute" ("" = none). Imported by '
                       "each worker after it starts, so a reload (SIGHUP) picks up new code.",
                       flag=Flag("app", "APP"))
    factory: bool = setting(False, "APP names a callable that takes no arguments and returns "
                            "the ASGI app.", flag="--factory")
    app_dir: str = setting("", "Directory put first on sys.path before APP is imported "
                           '("" = the working directory).', flag=Flag("--app-dir", "DIR"))
    lifespan: LifespanMode = setting(LifespanMode.AUTO, 'ASGI lifespan: "auto" (used if the '
                                     'app speaks it), "on" (required), "off".',
                                     flag="--lifespan")
    root: str = setting("", 'Directory served as static files ("" = none). With an app as '
                        "well, a path that exists under root is served from disk and "
                        "everything else goes to the app.", flag=Flag("--root", "DIR"))
    host: str = setting("127.0.0.1", 'Address every listener binds. "::" or "::1" for IPv6.',
                        flag="--host")
    port: int = setting(8443, "TCP port. 0 picks a free port once and binds every listener "
                        "to it.", check=between(0, 65535), flag="--port")
    uds: str = setting("", "Also serve on this Unix socket, one for all workers (for a proxy "
                       "on the same host; the same TLS setting as the TCP listeners). No demux "
                       "on it: SO_REUSEPORT groups are for TCP/UDP sockets, and the program "
                       'steers TCP connections. "" = none.', flag=Flag("--uds", "PATH"))
    workers: int = setting(0, "Worker processes, one SO_REUSEPORT listener each. 0 = the "
                           "number of CPUs.", check=between(0, 1024), flag="--workers")
    backlog: int = setting(2048, "listen(2) backlog of each listener (capped by "
                           "net.core.somaxconn).", check=positive, flag="--backlog")
    tcp_keepalive: int = setting(60, "Seconds a TCP connection may be silent before the "
                                 "kernel probes its peer (SO_KEEPALIVE, TCP_KEEPIDLE; then "
                                 "every quarter of it, 4 probes): a peer gone without a FIN "
                                 "(power, NAT, cable) is closed within twice this, not held "
                                 "for ever. 0 = off.", check=between(0, 32767))
    builtins: bool = setting(True, "Answer GET /_zion/healthz, /_zion/ready and /_zion/status "
                             "(loopback only) before the app. Nothing outside /_zion/ is ever "
                             "taken from the app.")
    user: str = setting("", 'Workers switch to this user after fork ("" = stay; started as '
                        "root, they still give up every capability).", flag=Flag("--user", "USER"))
    group: str = setting("", 'Workers switch to this group ("" = the user\'s primary group).',
                         flag=Flag("--group", "GROUP"))
    root_path: str = setting("", 'ASGI root_path: the prefix the app is mounted under behind a '
                             'proxy ("" = none).', flag=Flag("--root-path", "PATH"))
    proxy_headers: bool = setting(True, "Believe X-Forwarded-For/-Proto/-Host and Forwarded "
                                  "(client, scheme, server) from peers in forwarded_allow_ips.",
                                  flag="--proxy-headers")
    forwarded_allow_ips: str = setting("127.0.0.1,::1", 'Peers trusted to send forwarding '
                                       'headers: addresses or networks, comma-separated; "*" '
                                       "for every peer.", check=_ip_list,
                                       flag=Flag("--forwarded-allow-ips", "LIST"))
    proxy_protocol: ProxyProtocol = setting(
        ProxyProtocol.OFF, 'Every connection starts with a PROXY protocol header (HAProxy '
        'send-proxy/send-proxy-v2, AWS NLB), before TLS: "v1", "v2", "auto" (either) or '
        '"off". The app sees the client the header names; a connection without a valid '
        "header is closed.", flag="--proxy-protocol")
    proxy_allow_ips: str = setting("127.0.0.1,::1", "Peers allowed to connect when "
                                   "proxy_protocol is on (the balancers): addresses or "
                                   'networks, comma-separated; "*" for every peer. Others are '
                                   "closed at once.", check=_ip_list,
                                   flag=Flag("--proxy-allow-ips", "LIST"))
    proxy_protocol_trust_forwarded: bool = setting(
        False, "With proxy_protocol: also believe X-Forwarded-For/Forwarded (from a balancer "
        "in forwarded_allow_ips) over the PROXY header's client. Off: a TCP-mode balancer "
        "passes those headers through from the client, who can write any address in them.",
        flag="--proxy-protocol-trust-forwarded")
    reload: bool = setting(False, "Development: reload the workers with no downtime when a "
                           "watched .py file changes.", flag="--reload")
    reload_dirs: str = setting("", 'Directories --reload watches, separated by ":" ("" = '
                               "app_dir or the working directory).",
                               flag=Flag("--reload-dir", "DIR", repeat=":"))
    reload_include: str = setting("", 'Globs --reload watches besides "*.py", separated by '
                                  '":" (--reload-include is repeatable): "*.html" anywhere, '
                                  '"templates/*.html" in a directory of that name. As with '
                                  'uvicorn, --reload-exclude "*.py" drops the Python files.',
                                  flag=Flag("--reload-include", "GLOB", repeat=":"))
    reload_exclude: str = setting("", 'Globs --reload ignores even when included, separated '
                                  'by ":" (--reload-exclude is repeatable); .git, __pycache__, '
                                  ".venv, node_modules and editor swap files always are.",
                                  flag=Flag("--reload-exclude", "GLOB", repeat=":"))
    headers: str = setting("", 'Headers added to every response, one "Name: value" per line '
                           "(--header is repeatable).", check=_header_lines,
                           flag=Flag("--header", "NAME:VALUE", repeat="\n"))
    server_header: bool = setting(True, 'Send "server: zion" (an app\'s own server header '
                                  "always wins).", flag="--server-header")
    date_header: bool = setting(True, 'Send the "date" header.', flag="--date-header")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    enabled: bool = setting(True, "Serve HTTPS. --no-tls serves plain HTTP/1.1 (scheme http, "
                            "ws://) for a TLS-terminating proxy in front; the rest of [tls] "
                            "is then ignored.", flag="--tls")
    certfile: str = setting("", "PEM certificate chain. With keyfile; both empty = a "
                            "self-signed certificate for localhost, 127.0.0.1 and ::1, made "
                            "once in state_dir.", flag=Flag("--ssl-certfile", "PEM"))
    keyfile: str = setting("", "PEM private key for certfile.",
                           flag=Flag("--ssl-keyfile", "PEM"))
    state_dir: str = setting("", 'Where the self-signed certificate and other state live ("" '
                             "= /var/lib/zion for root, $XDG_STATE_HOME/zion or "
                             "~/.local/state/zion otherwise).")
    keyfile_password: str = setting("", "Password of an encrypted keyfile.",
                                    flag=Flag("--ssl-keyfile-password", "PASSWORD"))
    min_version: TLSVersion = setting(TLSVersion.V1_2, 'Oldest protocol accepted: "1.2" or '
                                      '"1.3". Nothing older is ever offered.')
    http2: bool = setting(True, 'Offer HTTP/2 in ALPN ("h2" before "http/1.1"); clients that '
                          "choose it get HTTP/2, the rest HTTP/1.1. --no-http2: every "
                          "connection is HTTP/1.1.", flag="--http2")
    http3: bool = setting(False, "Serve HTTP/3 (QUIC, aioquic) on UDP on the same port: one "
                          "UDP socket per worker, in a reuseport group whose eBPF program "
                          "(bpf/zion_quic.c) steers each QUIC packet to the worker owning its "
                          "connection ID (docs/http3.md).",
                          flag="--http3")
    ciphers: str = setting(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
        "OpenSSL cipher list for TLS 1.2 (the default is Mozilla's \"intermediate\": ECDHE "
        "with AES-GCM or ChaCha20, no CBC); TLS 1.3 suites are not affected.",
        flag=Flag("--ssl-ciphers", "LIST"))
    groups: str = setting("X25519:P-256:P-384", "Key-exchange groups offered and accepted "
                          "(TLS 1.2 and 1.3), OpenSSL names separated by \":\" (the default "
                          "is Mozilla's \"intermediate\"; OpenSSL's own adds X448 and P-521).",
                          flag=Flag("--ssl-groups", "LIST"))
    ticket_key_lifetime: float = setting(
        14400.0, "Seconds between session-ticket key rotations (0 = only on reload). A "
        "rotation is a zero-downtime reload: every reload makes new keys. A leaked key "
        "decrypts the tickets issued under it, and so (TLS 1.2) those sessions' traffic, "
        "for as long as it was in use.", check=non_negative)
    ca_certs: str = setting("", "CA bundle (PEM) that client certificates must chain to.",
                            flag=Flag("--ssl-ca-certs", "PEM"))
    cert_reqs: CertReqs = setting(CertReqs.NONE, 'Client certificates: "none", "optional" '
                                  '(verified when sent) or "required". Needs ca_certs.',
                                  flag="--ssl-cert-reqs")


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_request_line: int = setting(8192, "Longest request line (method, target, version), "
                                    "bytes. Longer: 414.", check=positive)
    max_header_size: int = setting(16384, "Total size of the header section, bytes. Larger: "
                                   "431.", check=positive)
    max_headers: int = setting(100, "Most header fields in one request. More: 431.",
                               check=positive)
    max_body_size: int = setting(10485760, "Largest request body, bytes (0 = no limit). "
                                 "Larger: 413.", check=non_negative,
                                 flag=Flag("--limit-max-body-size", "BYTES"))
    header_timeout: float = setting(10.0, "Seconds a client has to send a complete header "
                                    "section (slowloris). Then: 408.", check=positive)
    body_timeout: float = setting(8.0, "Seconds a request body may go without a byte (cuts "
                                  "slowhttptest's slow-body pacing of one byte per 10 s). Then: "
                                  "408, or a close once the response has begun.",
                                  check=positive)
    send_timeout: float = setting(30.0, "Seconds a client may leave the response unread "
                                  "(write buffer full, nothing taken) before the connection is "
                                  "closed.", check=positive)
    keepalive_timeout: float = setting(5.0, "Seconds an idle keep-alive connection stays "
                                       "open.", check=non_negative,
                                       flag=Flag("--keepalive-timeout", "S",
                                                 aliases=("--timeout-keep-alive",)))
    handshake_timeout: float = setting(10.0, "Seconds the TLS handshake may take.",
                                       check=positive)
    write_buffer_high: int = setting(262144, "Bytes buffered for a slow reader before the "
                                     "response writer waits for it.", check=positive)
    h2_max_streams: int = setting(100, "HTTP/2 streams open at once on one connection (at "
                                  "most 128, the frame layer's own cap). More: REFUSED_STREAM.",
                                  check=between(1, 128))
    h2_flood_per_second: int = setting(100, "HTTP/2 stream resets, SETTINGS or PINGs a client "
                                       "may send per second on one connection (rapid reset, "
                                       "CVE-2023-44487). More: GOAWAY ENHANCE_YOUR_CALM.",
                                       check=positive)
    h2_stream_window: int = setting(262144, "HTTP/2 receive window of each stream, bytes "
                                    "(SETTINGS_INITIAL_WINDOW_SIZE): request body bytes a client "
                                    "may send ahead of what the app has read. A connection holds "
                                    "at most h2_max_streams times this, unread.",
                                    check=between(65535, 2**31 - 1))
    h2_connection_window: int = setting(1048576, "HTTP/2 receive window of a whole connection, "
                                        "bytes: how far a client may send ahead, across its "
                                        "streams, of what zion has taken in. Given back as "
                                        "bytes arrive: an app that does not read holds only "
                                        "its own stream's window, never the connection's.",
                                        check=between(65535, 2**31 - 1))
    unread_body_per_worker: int = setting(67108864, "Request body bytes, in all, that a "
                                          "worker's HTTP/2 and HTTP/3 connections may hold "
                                          "unread by their apps. Below it a connection's "
                                          "window is given back as bytes arrive (an app that "
                                          "does not read holds only its own stream); past it each "
                                          "connection holding unread bytes gets no more "
                                          "window for them, so the clients that sent them "
                                          "wait and a worker holds at most this plus "
                                          "its connection window (h2_/h3_connection_window) "
                                          "per connection.",
                                          check=positive)
    h2_ping_interval: float = setting(30.0, "Seconds an HTTP/2 connection with streams open "
                                      "may be silent before zion sends a PING (0 = never).",
                                      check=non_negative)
    h2_ping_timeout: float = setting(15.0, "Seconds a PING may go unanswered (no byte at all "
                                     "from the client) before the connection is closed.",
                                     check=positive)
    h3_max_streams: int = setting(128, "HTTP/3 requests open at once on one QUIC connection "
                                  "(the client's initial MAX_STREAMS for bidirectional streams, "
                                  "RFC 9000 4.6; one more is granted as each ends). A client "
                                  "waits past it; opening one anyway closes the connection "
                                  "(STREAM_LIMIT_ERROR). Each may hold h3_stream_window of "
                                  "unread body.", check=between(1, 1024),
                                  flag=Flag("--limit-h3-max-streams", "N"))
    h3_retry_above: int = setting(64, "QUIC handshakes in progress on one worker past which a "
                                  "new client must first prove its address with a Retry (RFC "
                                  "9000 8.1.2; one more round trip): an Initial costs its sender "
                                  "nothing and its source may be forged, a handshake costs the "
                                  "worker a connection's state and a signature. 0 = a Retry "
                                  "for every new connection.", check=non_negative,
                                  flag=Flag("--limit-h3-retry-above", "N"))
    h3_stream_window: int = setting(262144, "HTTP/3 receive window of each request stream, "
                                    "bytes (QUIC initial_max_stream_data, RFC 9000 4.1): "
                                    "request body bytes a client may send ahead of what the "
                                    "app has read. It slides past what arrived, never doubles, "
                                    "and stays put while the app has 64 KiB unread.",
                                    check=between(16384, 2**31 - 1))
    h3_connection_window: int = setting(1048576, "HTTP/3 receive window of a whole QUIC "
                                        "connection, bytes (initial_max_data): how far past "
                                        "what arrived, across its streams, a client may send. "
                                        "It slides on while an app does not read (that "
                                        "stream's own window stays put), so the other "
                                        "requests go on.", check=between(65536, 2**31 - 1))
    h3_idle_timeout: float = setting(60.0, "Seconds without a packet after which a QUIC "
                                     "connection is gone, silently (max_idle_timeout, RFC "
                                     "9000 10.1; the smaller of the client's and this counts). "
                                     "Not keepalive_timeout: a connection with no request "
                                     "closes after that, but while an app takes its time no "
                                     "packet need flow.", check=positive)
    max_requests: int = setting(0, "A worker that has served this many requests drains and "
                                "is replaced (0 = never), against leaks in app code.",
                                check=non_negative, flag=Flag("--limit-max-requests", "N"))
    max_requests_jitter: int = setting(0, "Up to this many more, at random per worker, so "
                                       "workers do not all restart at once.",
                                       check=non_negative,
                                       flag=Flag("--limit-max-requests-jitter", "N"))
    max_connections: int = setting(10000, "Open connections per worker; past this a request "
                                   "is answered 503 and its connection closed.",
                                   check=positive, flag=Flag("--max-connections", "N"))
    concurrency: int = setting(0, "Load shedding: a worker with this many connections open, "
                               "or this many requests in flight, answers the next request at "
                               "once with 503 and Retry-After instead of making it wait (0 = "
                               "off; uvicorn's --limit-concurrency).", check=non_negative,
                               flag=Flag("--limit-concurrency", "N"))
    retry_after: int = setting(1, "Seconds in the Retry-After header of a shed request's 503.",
                               check=non_negative, flag=Flag("--retry-after", "S"))
    request_timeout: float = setting(0.0, "Seconds an app may take over one HTTP request (0 = "
                                     "no limit): then it is cancelled (it sees CancelledError) "
                                     "and the client gets 504, or, if the response head is "
                                     "out, its connection (HTTP/2: its stream) is closed. A "
                                     "streaming response is governed by send_timeout from its "
                                     "first body chunk on, a WebSocket by the [websocket] "
                                     "timeouts, not by this.", check=non_negative,
                                     flag=Flag("--timeout-request", "S"))
    worker_memory: int = setting(0, "MiB of resident memory (RSS) a worker may reach (0 = no "
                                 "limit). Past it the worker takes no new connections, a "
                                 "replacement starts, and once that one is ready the old one "
                                 "drains and exits; past 1.5 times it the worker is killed "
                                 "at once.", check=non_negative,
                                 flag=Flag("--limit-worker-memory", "MIB"))


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    drain_timeout: float = setting(30.0, "Seconds in-flight requests (and open WebSockets) get "
                                   "to finish on SIGTERM/SIGINT or reload.", check=non_negative,
                                   flag=Flag("--drain-timeout", "S",
                                             aliases=("--timeout-graceful-shutdown",)))
    boot_timeout: float = setting(60.0, "Seconds a worker has to become ready before it is "
                                  "killed and counted as failed.", check=positive)
    respawn_backoff: float = setting(0.1, "First delay, seconds, before a dead worker is "
                                     "replaced; doubles per failure in a row.",
                                     check=non_negative)
    respawn_backoff_max: float = setting(5.0, "Largest respawn delay, seconds.",
                                         check=non_negative)
    shutdown_delay: float = setting(0.0, "Seconds between SIGTERM and the start of the drain "
                                    "during which readiness (/_zion/ready, the admin /ready) "
                                    "answers 503 and the HAProxy agent says drain, while every "
                                    "listener keeps accepting and serving: the time a "
                                    "balancer or Kubernetes needs to stop sending traffic "
                                    "here (a preStop sleep, without one). A second signal "
                                    "ends it early.", check=non_negative,
                                    flag=Flag("--shutdown-delay", "S"))
    stuck_timeout: float = setting(0.0, "Seconds a worker's event loop may stay blocked (no "
                                   "heartbeat: a long synchronous call) before the worker is "
                                   "replaced and its accept queue moved (0 = never). With it "
                                   "set, the log shows the blocked worker's Python stack once, "
                                   "as soon as the loop has been blocked for the demux's stall "
                                   "threshold. A busy worker whose loop turns is never "
                                   "killed.", check=non_negative,
                                   flag=Flag("--timeout-worker-stuck", "S"))
    crash_loop_limit: int = setting(5, "A slot whose worker dies this many times in a row "
                                    "without ever becoming ready stops the server with one "
                                    "error line (the app can never start).", check=positive)


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = setting(LogFormat.LOGFMT, '"logfmt" (key=value), "json", or "console" '
                                "(colours only on a terminal).", flag="--log-format")
    level: LogLevel = setting(LogLevel.INFO, "Lowest level logged.", flag="--log-level")
    access_log: bool = setting(False, "One line per request. Off by default: it costs about a "
                               "third of the throughput.", flag="--access-log")
    access_log_format: str = setting(
        "", "The access line as a %-format of gunicorn's atoms (%(h)s %(l)s %(u)s %(t)s "
        '"%(r)s" %(s)s %(b)s "%(f)s" "%(a)s", %(D)s microseconds, %({name}i)s a request '
        "header) or uvicorn's (%(client_addr)s %(request_line)s %(status_code)s), logged as "
        '"line" of the access event. "" = the structured event: method, path with query, '
        "status, http version, client, port, bytes, duration_us.", check=_access_log_format,
        flag=Flag("--access-log-format", "FORMAT"))
    config: str = setting("", "A logging configuration for the app's own loggers (uvicorn's "
                          "--log-config): a dictConfig as JSON or YAML (.json, .yaml, .yml), "
                          'or an INI fileConfig. Applied in every process after zion\'s own. "" '
                          "= none.", flag=Flag("--log-config", "FILE"))


@dataclass(frozen=True, slots=True)
class DemuxSettings:
    enabled: bool = setting(True, "Load the SK_REUSEPORT eBPF program that picks the worker "
                            "for each new connection. Needs CAP_BPF (or CAP_SYS_ADMIN) in the "
                            "master only; without it, or if anything fails, zion logs why and "
                            "the kernel's reuseport hash is used.", flag="--bpf-demux")
    mode: DemuxMode = setting(DemuxMode.LEAST_LOADED, '"least-loaded": the worker where a new '
                              "connection waits least, weighing every worker (its connections, "
                              "requests in flight, connections not yet accepted; a blocked or "
                              'stalled one comes last); "hash": the connection hash over live '
                              'workers; "cpu": the worker pinned to the CPU that handled the '
                              "SYN.", flag="--demux")
    stall_threshold_ms: int = setting(100, "A worker whose heartbeat is older than this, "
                                      "milliseconds, gets no new connections.", check=positive)
    heartbeat_interval_ms: int = setting(5, "How often a worker with work in hand (requests in "
                                         "flight, TLS handshakes) publishes its heartbeat, "
                                         "milliseconds; one without, every four intervals. Two "
                                         "intervals without one while it has work: its loop is "
                                         "blocked, and new connections go to others (and, with "
                                         "migrate and requeue, its accept queue moves to a free "
                                         "worker).", check=positive)
    kernel_headers: str = setting("", 'Kernel headers bcc compiles against ("" = auto: the '
                                  "running kernel's /lib/modules/$(uname -r)/build, else a "
                                  "Debian linux-headers-* tree under /usr/src merged into "
                                  "<state_dir>/kernel-headers; never written to /lib/modules).")
    program: str = setting("", 'The program source ("" = the one shipped in the package, '
                           "bpf/zion_demux.c).")
    objects: str = setting("", "Where the compiled program (bytecode and map references, "
                           "compiled once by bcc, loaded without headers or LLVM) is looked "
                           'for and kept ("" = the package\'s _data/objects, written by '
                           "scripts/setup.sh, then <state_dir>/demux-objects, written by a "
                           "start that compiled).")
    migrate: bool = setting(True, "Load the program as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE "
                            "(Linux 5.14+): a listener that closes (a shrinking reload, a "
                            "dead worker's) hands its queued and half-open connections to "
                            "a live worker the program picks. Off, or on older kernels: a "
                            "dead worker's queue waits for its replacement, and a retired "
                            "listener is drained by its worker.")
    requeue: bool = setting(True, "With migrate: the master moves the accept queue of a "
                            "worker whose loop is blocked (a long synchronous call, a stop "
                            "signal) to a free worker, as one shared queue would. It looks "
                            "every two heartbeat intervals while connections arrive or any "
                            "worker has work (spaced out to eight while every worker beats "
                            "on time), every 100 ms otherwise.")


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    max_size: int = setting(16777216, "Largest incoming message, bytes. Larger: close 1009.",
                            check=positive, flag=Flag("--ws-max-size", "BYTES"))
    ping_interval: float = setting(20.0, "Seconds between keep-alive pings (0 = none).",
                                   check=non_negative, flag=Flag("--ws-ping-interval", "S"))
    ping_timeout: float = setting(20.0, "Seconds a pong may take before the connection is "
                                  "closed (1011).", check=non_negative,
                                  flag=Flag("--ws-ping-timeout", "S"))
    per_message_deflate: bool = setting(True, "Offer permessage-deflate compression (RFC "
                                        "7692).", flag="--ws-per-message-deflate")
    max_queue: int = setting(32, "Messages buffered for an app that is not receiving; past "
                             "this the socket is not read until the app catches up.",
                             check=positive, flag=Flag("--ws-max-queue", "N"))
    max_queue_bytes: int = setting(1048576, "Decoded bytes of messages buffered for an app "
                                   "that is not receiving; past this the socket is not read "
                                   "(nor more input inflated) until the app takes half. One "
                                   "connection holds at most this plus max_size decoded; the "
                                   "WebSockets of one HTTP/2 connection share it (at most "
                                   "this plus 2 x max_size together).",
                                   check=positive)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: str = setting("", "HOST:PORT where the master serves plain HTTP to operators: GET "
                          "/metrics (Prometheus), /status (every worker, JSON) and /ready (200 "
                          'or 503, for readiness probes). "" = off. No authentication: bind a '
                          "private address.", check=_host_port_or_off,
                          flag=Flag("--admin", "HOST:PORT"))
    agent: str = setting("", "HOST:PORT where HAProxy's agent-check reads one line about this "
                         'host: "up ready N%", "drain" (stopping or reloading) or "down '
                         '#no healthy worker". "" = off.', check=_host_port_or_off,
                         flag=Flag("--agent", "HOST:PORT"))


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "tls": TLSSettings,
    "limits": LimitsSettings,
    "supervisor": SupervisorSettings,
    "log": LogSettings,
    "demux": DemuxSettings,
    "websocket": WebSocketSettings,
    "admin": AdminSettings,
}


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    log: LogSettings = field(default_factory=LogSettings)
    demux: DemuxSettings = field(default_factory=DemuxSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    # Where the values came from, for error messages on reload and `zion doctor`.
    config_file: str | None = None
    # Where --no-bpf-demux / enabled=false came from, for the boot line.
    demux_disabled_by: str | None = None


@dataclass(frozen=True)
class Declared:
    section: str
    name: str
    type: type
    default: Any
    help: str
    check: Check | None
    flag: Flag | None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def declared() -> Iterator[Declared]:
    """Every setting, in declaration order."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield Declared(section, f.name, hints[f.name], f.default, f.metadata["help"],
                           f.metadata["check"], f.metadata["flag"])


_BY_KEY = {d.key: d for d in declared()}


def _coerce(decl: Declared, value: Any, origin: str) -> Any:
    """Check (file values) or parse (env/flag strings) one value to its type."""
    where = f"{decl.key} (from {origin})"
    want = decl.type
    if isinstance(want, type) and issubclass(want, StrEnum):
        try:
            value = want(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} must be one of "
                              f"{', '.join(m.value for m in want)}") from None
    else:
        if isinstance(value, str) and want is not str:
            text = value.strip()
            try:
                if want is bool:
                    lowered = text.lower()
                    if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = lowered in ("1", "true", "yes", "on")
                else:
                    value = typing.cast(Callable[[str], Any], want)(text)
            except ValueError:
                raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}") from None
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}")
    problem = decl.check(value) if decl.check else None
    if problem:
        raise ConfigError(f"{where}: {value!r} {problem}")
    return value


def _merge(merged: dict[str, dict[str, Any]], origins: dict[str, str],
           table: Mapping[str, Any], origin: str) -> None:
    for section, values in table.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{section}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            decl = _BY_KEY.get(f"{section}.{key}")
            if decl is None:
                raise ConfigError(f"{origin}: unknown key {section}.{key}")
            merged[section][key] = _coerce(decl, value, origin)
            origins[decl.key] = origin


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        # TOML is UTF-8 by definition (toml.io 1.0, "Spec").
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: invalid TOML: byte 0x{data[exc.start]:02x} is not UTF-8 "
                          f"(at line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """ZION_<SECTION>_<KEY>=value. Section names have no underscore; keys may.

    A variable whose section is not one of ours (ZION_ENV, an app's own
    ZION_SOMETHING) is left alone; an unknown key inside a known section is a
    typo and an error (raised when merged)."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("ZION_"):
            continue
        section, _, key = name[len("ZION_"):].lower().partition("_")
        if section in SECTIONS and key:
            out.setdefault(section, {})[key] = value
    return out


def load_settings(
    config_file: str | None = None,
    cli: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the one Settings object; raise ConfigError naming key and origin."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: dict[str, str] = {}
    if config_file:
        path = Path(config_file)
        _merge(merged, origins, _read_toml(path), str(path))
    environ = os.environ if environ is None else environ
    for section, values in env_overrides(environ).items():
        for key, value in values.items():
            _merge(merged, origins, {section: {key: value}},
                   f"ZION_{section.upper()}_{key.upper()}")
    if cli:
        _merge(merged, origins, cli, "command line")
    if "server.workers" not in origins and environ.get("WEB_CONCURRENCY"):
        # uvicorn's and gunicorn's convention, below every zion source.
        _merge(merged, origins, {"server": {"workers": environ["WEB_CONCURRENCY"]}},
               "WEB_CONCURRENCY")
    sections = {s: cls(**merged[s]) for s, cls in SECTIONS.items()}
    _check_cross_field(sections, origins)
    demux_disabled_by = None
    if not sections["demux"].enabled:
        demux_disabled_by = origins.get("demux.enabled", "config")
    return Settings(**sections, config_file=config_file, demux_disabled_by=demux_disabled_by)


def _check_cross_field(sections: dict[str, Any], origins: dict[str, str]) -> None:
    tls: TLSSettings = sections["tls"]
    if tls.enabled and bool(tls.certfile) != bool(tls.keyfile):
        given = "tls.certfile" if tls.certfile else "tls.keyfile"
        raise ConfigError(f"{given} (from {origins.get(given)}): tls.certfile and tls.keyfile "
                          "must be given together")
    if tls.http3 and not tls.enabled:
        raise ConfigError(f"tls.http3 (from {origins.get('tls.http3')}): HTTP/3 runs over QUIC, "
                          "which is always TLS 1.3; it cannot go with --no-tls")
    if tls.http3 and tls.cert_reqs != CertReqs.NONE:
        # aioquic 1.7's server never sends a CertificateRequest: HTTP/3 would
        # serve every client, certificate or not, past the TCP listener's check.
        raise ConfigError(f"tls.http3 (from {origins.get('tls.http3')}): HTTP/3 cannot go with "
                          f"tls.cert_reqs {tls.cert_reqs} (from {origins.get('tls.cert_reqs')}):"
                          " its QUIC stack never asks for a client certificate")
    server: ServerSettings = sections["server"]
    if server.proxy_protocol != ProxyProtocol.OFF and not server.proxy_allow_ips.strip(" ,"):
        raise ConfigError(f"server.proxy_allow_ips (from {origins.get('server.proxy_allow_ips')})"
                          f": empty, so with proxy_protocol {server.proxy_protocol} no peer "
                          'could connect; name the balancers (or "*")')
    if server.root and not Path(server.root).is_dir():
        raise ConfigError(f"server.root (from {origins.get('server.root')}): "
                          f"{server.root!r} is not a directory")
    # A directory that is not there would only show later, as an import error
    # in every worker or as a watcher thread dying with --reload.
    for key, dirs in (("server.app_dir", [server.app_dir]),
                      ("server.reload_dirs", server.reload_dirs.split(os.pathsep))):
        for d in dirs:
            if d and not Path(d).is_dir():
                raise ConfigError(f"{key} (from {origins.get(key)}): {d!r} is not a directory")
    if server.app and ":" not in server.app:
        raise ConfigError(f"server.app (from {origins.get('server.app')}): {server.app!r} "
                          "must be of the form module:attribute")
    if server.user or server.group:
        from zion.privileges import resolve

        try:
            resolve(server.user, server.group)
        except KeyError as exc:
            key = "server.group" if server.group and "group" in str(exc) else "server.user"
            raise ConfigError(f"{key} (from {origins.get(key)}): no such "
                              f"{key.split('.')[1]}: {exc.args[0]}") from None
    if tls.enabled and tls.cert_reqs != CertReqs.NONE and not tls.ca_certs:
        raise ConfigError(f"tls.cert_reqs (from {origins.get('tls.cert_reqs')}): "
                          f"{tls.cert_reqs} needs tls.ca_certs")
    log: LogSettings = sections["log"]
    if log.config and not Path(log.config).is_file():
        raise ConfigError(f"log.config (from {origins.get('log.config')}): {log.config!r} is "
                          "not a file")
    demux: DemuxSettings = sections["demux"]
    if 4 * demux.heartbeat_interval_ms >= demux.stall_threshold_ms:
        # A worker without work beats every four intervals (IDLE_BEATS in
        # zion/demux/board.py): past the threshold it would look stalled.
        raise ConfigError(
            f"demux.heartbeat_interval_ms = {demux.heartbeat_interval_ms} (from "
            f"{origins.get('demux.heartbeat_interval_ms', 'default')}) must be under a "
            f"quarter of demux.stall_threshold_ms = {demux.stall_threshold_ms} (from "
            f"{origins.get('demux.stall_threshold_ms', 'default')}): an idle worker beats "
            "every four intervals")
    sup: SupervisorSettings = sections["supervisor"]
    if sup.respawn_backoff_max < sup.respawn_backoff:
        raise ConfigError("supervisor.respawn_backoff_max: must be at least "
                          "supervisor.respawn_backoff")


def worker_count(settings: Settings) -> int:
    return settings.server.workers or (os.cpu_count() or 1)


_TOML_HEADER = """\
# zion — the default configuration.
#
# Generated from the declarations in zion/settings.py (render_default_toml);
# tests/test_settings.py fails when the two differ. A file given with
# `zion serve --config FILE` overrides these key by key, then
# ZION_<SECTION>_<KEY> environment variables (e.g. ZION_SERVER_PORT=9443,
# ZION_LIMITS_MAX_BODY_SIZE=1048576), then command-line flags. Unknown keys
# are an error, not a silent no-op.
"""


def render_default_toml() -> str:
    import textwrap

    lines = [_TOML_HEADER.rstrip("\n")]
    section = None
    for d in declared():
        if d.section != section:
            section = d.section
            lines.append(f"[{section}]")
        lines += textwrap.wrap(d.help, 78, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"{d.name} = {_toml_value(d.default)}")
    out: list[str] = []
    for line in lines:
        if line.startswith("[") and out:
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
