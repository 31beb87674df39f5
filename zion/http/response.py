"""Response bytes: status lines, the cached Date/Server prefix, simple replies."""

from __future__ import annotations

import http
from email.utils import formatdate

SERVER_NAME = b"zion"

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} \r\n".encode()
    return line


class DateCache:
    """`date:` and `server:` header bytes, refreshed by the worker's 1 s tick
    instead of formatting a date for every response."""

    __slots__ = ("prefix",)

    def __init__(self) -> None:
        self.prefix = b""
        self.refresh()

    def refresh(self) -> None:
        self.prefix = b"server: " + SERVER_NAME + b"\r\ndate: " + formatdate(
            usegmt=True).encode() + b"\r\n"


def simple(
    status: int,
    body: bytes,
    date: DateCache,
    content_type: bytes = b"text/plain; charset=utf-8",
    keep_alive: bool = True,
    head: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A whole response with a fixed body, as one buffer (one TLS record)."""
    return b"".join((
        status_line(status),
        date.prefix,
        b"content-type: ", content_type, b"\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\n",
        extra,
        b"" if keep_alive else b"connection: close\r\n",
        b"\r\n",
        b"" if head else body,
    ))


def error(status: int, date: DateCache, detail: str = "") -> bytes:
    """An error reply that always closes the connection."""
    phrase = http.HTTPStatus(status).phrase if status in STATUS_LINES else "Error"
    text = f"{status} {phrase}" + (f": {detail}" if detail else "") + "\n"
    return simple(status, text.encode(), date, keep_alive=False)
