"""Is stderr the systemd journal, and the sd-daemon priority prefix.

journald reads an `<N>` prefix (sd-daemon(3) priorities) at the start of
each line of a service's stdout/stderr stream when SyslogLevelPrefix=yes (the
default); without it every line is PRIORITY=6 and `journalctl -p warning`
shows none of zion's warnings. systemd sets $JOURNAL_STREAM to the stream's
"device:inode" (systemd.exec(5)); it is inherited by children whose stderr
may point elsewhere, so it counts only when it matches fstat(2) of fd 2.
journald records the time and the pid itself, so those fields may go.
"""

from __future__ import annotations

import os
from typing import Any

# logging method / level name -> syslog priority (sd-daemon.h SD_ERR ...)
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
              "info": 6, "debug": 7, "trace": 7, "notset": 7}
# Fields journald records on its own (_SOURCE_REALTIME_TIMESTAMP, _PID).
REDUNDANT = ("ts", "pid")


def stderr_is_journal(fd: int = 2) -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(fd)
        return bool(ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def prefix(level: str) -> str:
    return f"<{PRIORITIES.get(level.lower(), 6)}>"


def drop_redundant(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: journald has the time and the pid already."""
    for key in REDUNDANT:
        event.pop(key, None)
    return event


def add_prefix(_: Any, method: str, line: str) -> str:
    """Last ProcessorFormatter step (after the renderer): every physical line
    gets the prefix, or a traceback's continuation lines would be PRIORITY=6."""
    tag = prefix(method)
    return "\n".join(tag + part for part in line.split("\n"))


def error_line(text: str) -> str:
    """An error printed before logging is configured (a config error)."""
    return prefix("error") + text if stderr_is_journal() else text
