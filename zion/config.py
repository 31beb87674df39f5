"""Configuration: parsed once, in the master, into one frozen `Settings`.

Precedence, lowest first: the embedded default (config/zion.toml) <- a file
given with --config <- ZION_<SECTION>_<KEY> environment <- CLI flags. Every
value is validated here, so workers never see a bad one; an error names the
key, where the value came from, and what is wrong, in one line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from zion.errors import ConfigError

DEMUX_MODES = ("least-loaded", "hash", "cpu")
LOG_FORMATS = ("logfmt", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
LIFESPAN_MODES = ("auto", "on", "off")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    app: str
    root: str
    host: str
    port: int
    workers: int
    backlog: int
    builtins: bool
    factory: bool
    app_dir: str
    lifespan: str
    reload: bool
    reload_dirs: str  # os.pathsep-separated


@dataclass(frozen=True, slots=True)
class TLSSettings:
    certfile: str
    keyfile: str
    state_dir: str
    min_version: str


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_request_line: int
    max_header_size: int
    max_headers: int
    max_body_size: int
    header_timeout: float
    keepalive_timeout: float
    handshake_timeout: float
    write_buffer_high: int
    max_connections: int


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    drain_timeout: float
    boot_timeout: float
    respawn_backoff: float
    respawn_backoff_max: float
    crash_loop_limit: int


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str
    level: str
    access_log: bool


@dataclass(frozen=True, slots=True)
class DemuxSettings:
    enabled: bool
    mode: str
    stall_threshold_ms: int
    heartbeat_interval_ms: int
    kernel_headers: str
    program: str


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    max_size: int
    ping_interval: float
    ping_timeout: float
    per_message_deflate: bool
    max_queue: int


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    tls: TLSSettings
    limits: LimitsSettings
    supervisor: SupervisorSettings
    log: LogSettings
    demux: DemuxSettings
    websocket: WebSocketSettings
    # Where the values came from, for error messages on reload and `zion doctor`.
    config_file: str | None = field(default=None)
    # Where --no-bpf-demux / enabled=false came from, for the boot line.
    demux_disabled_by: str | None = field(default=None)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "tls": TLSSettings,
    "limits": LimitsSettings,
    "supervisor": SupervisorSettings,
    "log": LogSettings,
    "demux": DemuxSettings,
    "websocket": WebSocketSettings,
}


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"

    return check


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "must be between 0 and 65535"


# Range checks beyond the type; keys not listed only need the right type.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "server.port": _port,
    "server.workers": lambda v: None if 0 <= v <= 1024 else "must be between 0 and 1024",
    "server.backlog": _positive,
    "server.lifespan": _choice(LIFESPAN_MODES),
    "websocket.max_size": _positive,
    "websocket.ping_interval": _non_negative,
    "websocket.ping_timeout": _non_negative,
    "websocket.max_queue": _positive,
    "tls.min_version": _choice(("1.2", "1.3")),
    "limits.max_request_line": _positive,
    "limits.max_header_size": _positive,
    "limits.max_headers": _positive,
    "limits.max_body_size": _non_negative,
    "limits.header_timeout": _positive,
    "limits.keepalive_timeout": _non_negative,
    "limits.handshake_timeout": _positive,
    "limits.write_buffer_high": _positive,
    "limits.max_connections": _positive,
    "supervisor.drain_timeout": _non_negative,
    "supervisor.boot_timeout": _positive,
    "supervisor.respawn_backoff": _non_negative,
    "supervisor.respawn_backoff_max": _non_negative,
    "supervisor.crash_loop_limit": _positive,
    "log.format": _choice(LOG_FORMATS),
    "log.level": _choice(LOG_LEVELS),
    "demux.mode": _choice(DEMUX_MODES),
    "demux.stall_threshold_ms": _positive,
    "demux.heartbeat_interval_ms": _positive,
}


def default_config_text() -> str:
    """The embedded default configuration, as shipped in the package."""
    return (resources.files("zion") / "_data" / "zion.toml").read_text(encoding="utf-8")


def _field_types(section: str) -> dict[str, type]:
    hints = {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}
    return {k: _TYPES[str(t)] for k, t in hints.items()}


_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(key: str, value: Any, want: type, origin: str) -> Any:
    """Check (file values) or parse (env/CLI strings) one value to its type."""
    where = f"{key} (from {origin})"
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if want is bool:
                lowered = text.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = lowered in ("1", "true", "yes", "on")
            elif want is int:
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}") from None
    elif want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}")
    check = _CHECKS.get(key)
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{where}: {value!r} {problem}")
    return value


def _merge_table(
    merged: dict[str, dict[str, Any]],
    origins: dict[str, str],
    table: Mapping[str, Any],
    origin: str,
) -> None:
    for section, values in table.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{section}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        types = _field_types(section)
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"{origin}: unknown key {section}.{key}")
            merged[section][key] = _coerce(f"{section}.{key}", value, types[key], origin)
            origins[f"{section}.{key}"] = origin


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """ZION_<SECTION>_<KEY>=value. Section names have no underscore; keys may.

    A variable whose section is not one of ours (ZION_ENV, an app's own
    ZION_SOMETHING) is not ours and is left alone; an unknown key inside a
    known section is a typo and an error (raised by _merge_table)."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("ZION_"):
            continue
        section, _, key = name[len("ZION_"):].lower().partition("_")
        if section in _SECTIONS and key:
            out.setdefault(section, {})[key] = value
    return out


def load_settings(
    config_file: str | None = None,
    cli: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the one Settings object; raise ConfigError naming key and origin."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    origins: dict[str, str] = {}
    _merge_table(merged, origins, tomllib.loads(default_config_text()), "embedded default")
    if config_file:
        path = Path(config_file)
        _merge_table(merged, origins, _read_toml(path), str(path))
    env = _env_overrides(os.environ if environ is None else environ)
    for section, values in env.items():
        for key, value in values.items():
            _merge_table(merged, origins, {section: {key: value}},
                         f"ZION_{section.upper()}_{key.upper()}")
    if cli:
        _merge_table(merged, origins, cli, "command line")
    for section, cls in _SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - merged[section].keys()
        if missing:
            raise ConfigError(f"embedded default: [{section}] lacks {', '.join(sorted(missing))}")
    sections = {s: cls(**merged[s]) for s, cls in _SECTIONS.items()}
    _check_cross_field(sections, origins)
    demux_disabled_by = None
    if not sections["demux"].enabled:
        demux_disabled_by = origins.get("demux.enabled", "config")
    return Settings(
        **sections,
        config_file=config_file,
        demux_disabled_by=demux_disabled_by,
    )


def _check_cross_field(sections: dict[str, Any], origins: dict[str, str]) -> None:
    tls: TLSSettings = sections["tls"]
    if bool(tls.certfile) != bool(tls.keyfile):
        given = "tls.certfile" if tls.certfile else "tls.keyfile"
        raise ConfigError(
            f"{given} (from {origins.get(given)}): tls.certfile and tls.keyfile "
            "must be given together"
        )
    server: ServerSettings = sections["server"]
    if server.root and not Path(server.root).is_dir():
        raise ConfigError(
            f"server.root (from {origins.get('server.root')}): {server.root!r} is not a directory"
        )
    if server.app and ":" not in server.app:
        raise ConfigError(
            f"server.app (from {origins.get('server.app')}): {server.app!r} "
            "must be of the form module:attribute"
        )
    sup: SupervisorSettings = sections["supervisor"]
    if sup.respawn_backoff_max < sup.respawn_backoff:
        raise ConfigError(
            "supervisor.respawn_backoff_max: must be at least supervisor.respawn_backoff"
        )


def worker_count(settings: Settings) -> int:
    return settings.server.workers or (os.cpu_count() or 1)
