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


def configure(fmt: str, level: str, worker: int | str = "master") -> None:
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
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(fmt),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


def get_logger(name: str = "zion") -> Any:
    return structlog.get_logger(name)
