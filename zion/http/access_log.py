"""The access log: one record per finished request -> one log line.

Without a format, the line is the structured event "access" with method,
path (with the query string), status, http (version, "1.1" too), client and
port, bytes (response body) and duration_us (microseconds: a fast request
takes tens of them, which whole milliseconds rounded to 0).

With --access-log-format, the line is that text under "line", the atoms
named as gunicorn's (%(h)s %(r)s %(s)s ...) or uvicorn's (%(client_addr)s
%(request_line)s %(status_code)s), so a format copied from either works.
Response headers (gunicorn's {name}o) and the environment ({name}e) are not
offered: the record does not carry them, and a format that names one is a
configuration error rather than a column of dashes.

I/O-free apart from the logger: the exchange's rules build the record and
call write(); the worker calls configure() once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zion.errors import ConfigError
from zion.log import get_logger

log = get_logger("zion.access")


@dataclass(frozen=True, slots=True)
class AccessRecord:
    method: str
    path: str
    query: bytes  # raw query string, b"" for none
    status: int
    body_bytes: int  # response body bytes sent
    client: tuple[str, int] | None
    http_version: str  # "1.0", "1.1", "2"
    duration_s: float
    scheme: str = "https"
    request_headers: Sequence[tuple[bytes, bytes]] = ()

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query.decode('latin-1')}" if self.query else self.path


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _clf_time(when: float) -> str:
    """[10/Oct/2000:13:55:36 +0000], the common log format's time, in UTC."""
    t = time.gmtime(when)
    return (f"[{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000]")


def _header(record: AccessRecord, name: str) -> str:
    wanted = name.lower().encode("latin-1")
    for key, value in record.request_headers:
        if key == wanted:
            return value.decode("latin-1")
    return "-"


def _request_line(r: AccessRecord) -> str:
    return f"{r.method} {r.target} HTTP/{r.http_version}"


# name -> value; gunicorn's atoms (docs.gunicorn.org, "access_log_format"),
# then uvicorn's names for the same things.
_ATOMS: dict[str, Any] = {
    "h": lambda r: r.client[0] if r.client else "-",
    "l": lambda r: "-",
    "u": lambda r: "-",
    "t": lambda r: _clf_time(time.time() - r.duration_s),
    "r": _request_line,
    "m": lambda r: r.method,
    "U": lambda r: r.path,
    "q": lambda r: r.query.decode("latin-1"),
    "H": lambda r: f"HTTP/{r.http_version}",
    "s": lambda r: str(r.status),
    "B": lambda r: str(r.body_bytes),
    "b": lambda r: str(r.body_bytes) if r.body_bytes else "-",
    "f": lambda r: _header(r, "referer"),
    "a": lambda r: _header(r, "user-agent"),
    "T": lambda r: str(int(r.duration_s)),
    "M": lambda r: str(int(r.duration_s * 1000)),
    "D": lambda r: str(int(r.duration_s * 1_000_000)),
    "L": lambda r: f"{r.duration_s:.6f}",
    "p": lambda r: f"<{os.getpid()}>",
    # uvicorn
    "client_addr": lambda r: f"{r.client[0]}:{r.client[1]}" if r.client else "-",
    "request_line": _request_line,
    "status_code": lambda r: str(r.status),
    # zion's own, for formats that want them
    "client_port": lambda r: str(r.client[1]) if r.client else "-",
    "scheme": lambda r: r.scheme,
}
_REQUEST_HEADER = re.compile(r"\{([^}]+)\}i")


class _Atoms(dict[str, str]):
    """The %-format mapping: each atom computed only if the format names it."""

    def __init__(self, record: AccessRecord) -> None:
        super().__init__()
        self.record = record

    def __missing__(self, key: str) -> str:
        atom = _ATOMS.get(key)
        if atom is not None:
            value: str = atom(self.record)
            return value
        header = _REQUEST_HEADER.fullmatch(key)
        if header is not None:
            return _header(self.record, header.group(1))
        raise KeyError(key)


_FORMAT = ""


def format_line(fmt: str, record: AccessRecord) -> str:
    return fmt % _Atoms(record)


def check_format(fmt: str) -> str | None:
    """None if every atom of fmt is known, else what is wrong (for settings)."""
    if not fmt:
        return None
    sample = AccessRecord("GET", "/", b"", 200, 0, ("127.0.0.1", 1), "1.1", 0.0)
    try:
        format_line(fmt, sample)
    except KeyError as exc:
        return (f"has the unknown atom %({exc.args[0]})s; known: "
                f"{' '.join(_ATOMS)} and {{header}}i")
    except (ValueError, TypeError) as exc:
        return f"is not a %-format: {exc}"
    return None


def configure(fmt: str) -> None:
    """The format for this process ("" = the structured line)."""
    global _FORMAT
    problem = check_format(fmt)
    if problem:
        raise ConfigError(f"log.access_log_format {problem}")
    _FORMAT = fmt


def write(record: AccessRecord) -> None:
    if _FORMAT:
        log.info("access", line=format_line(_FORMAT, record))
        return
    client = record.client
    log.info("access", method=record.method, path=record.target, status=record.status,
             http=record.http_version, client=client[0] if client else None,
             port=client[1] if client else None, bytes=record.body_bytes,
             duration_us=int(record.duration_s * 1_000_000))
