"""structlog, configured once per process.

Every line carries `worker` (index, or "master") and `pid`. The default
renderer is logfmt so lines such as `bpf_demux=attached fd=7` appear literally;
JSON is for machines; console colours only when stderr is a terminal. stdlib
records (asyncio, uvloop, the app's own logging) go through the same
processors via ProcessorFormatter, so everything looks the same.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from zion import journald

# "trace" is uvicorn's name for below debug (5); zion logs nothing there of its own.
_LEVELS = {"trace": 5, "debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def _renderer(fmt: str) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.LogfmtRenderer(
        key_order=["ts", "level", "worker", "pid", "event"], drop_missing=True
    )


def configure(fmt: str, level: str, worker: int | str = "master",
              log_config: str = "") -> None:
    """(Re)configure logging for this process. Called after fork in workers."""
    identity: dict[str, Any] = {"worker": worker, "pid": os.getpid()}

    def add_identity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in identity.items():
            event.setdefault(key, value)
        return event

    shared: list[Any] = [
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.add_log_level,
        add_identity,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: a worker reconfigures after fork and its loggers must see it.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, stderr is the journal: each line gets its <N> priority.
    journal = journald.stderr_is_journal(sys.stderr.fileno())
    before: list[Any] = [journald.drop_redundant] if journal else []
    after: list[Any] = [journald.add_prefix] if journal else []
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Records of stdlib loggers (the app's, "py.warnings") say whose they are.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), structlog.stdlib.add_logger_name,
                               *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                *before,
                _renderer(fmt),
                *after,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # `warnings` go to the "py.warnings" logger, so through the handler above
    # (JSON with --log-format json), not to stderr as plain text.
    logging.captureWarnings(True)
    if log_config:
        apply_log_config(log_config)
        if not root.handlers:
            # An INI file must name a root logger, often with no handler:
            # zion's lines (and the app's, propagated) keep zion's.
            root.addHandler(handler)


def apply_log_config(path: str) -> None:
    """--log-config: a logging dictConfig for the app's own loggers, as JSON,
    YAML (.yaml/.yml) or an INI fileConfig, like uvicorn's. zion's loggers
    exist already: unless the file says otherwise they stay enabled
    (disable_existing_loggers defaults to False, not dictConfig's True), and
    a root logger left with no handler keeps zion's.
    ConfigError names the file and what is wrong."""
    import logging.config

    from zion.errors import ConfigError

    try:
        if path.endswith((".json", ".yaml", ".yml")):
            with open(path, encoding="utf-8") as fh:
                if path.endswith(".json"):
                    import json

                    config = json.load(fh)
                else:
                    try:
                        import yaml  # type: ignore[import-untyped]
                    except ImportError:
                        raise ConfigError(f"log.config {path}: a YAML file needs PyYAML "
                                          "(pip install pyyaml)") from None
                    config = yaml.safe_load(fh)
            if not isinstance(config, dict):
                raise ConfigError(f"log.config {path}: not a mapping (a logging dictConfig)")
            config.setdefault("version", 1)
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"log.config {path}: no such file") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        # json/yaml parse errors are ValueError subclasses (yaml.YAMLError is
        # not: caught by its base below); dictConfig raises ValueError naming
        # the part it could not configure.
        raise ConfigError(f"log.config {path}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, configparser.Error
        raise ConfigError(f"log.config {path}: {type(exc).__name__}: {exc}") from None


def early_error(fmt: str, event: str, message: str) -> None:
    """One error line before the configuration is known (argument and config
    errors): JSON when the format asked for is json, else `zion: message`."""
    if fmt == "json":
        configure("json", "info")
        get_logger("zion").error(event, error=message)
    else:
        # under systemd, an error for `journalctl -p err` (journald.py)
        print(journald.error_line(f"zion: {message}"), file=sys.stderr)


def get_logger(name: str = "zion") -> Any:
    return structlog.get_logger(name)
