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
    """The default header bytes of every response (`server:`, `date:` and the
    operator's --header ones), refreshed by the worker's tick instead of
    formatting a date for every response. `without_server` is for a response
    whose app sent its own `server` header."""

    __slots__ = ("prefix", "without_server", "_server", "_date", "_extra")

    def __init__(self, server: bool = True, date: bool = True,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._server = server
        self._date = date
        self._extra = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
        self.prefix = self.without_server = b""
        self.refresh()

    def refresh(self) -> None:
        date = b"date: " + formatdate(usegmt=True).encode() + b"\r\n" if self._date else b""
        self.without_server = date + self._extra
        self.prefix = (b"server: " + SERVER_NAME + b"\r\n" if self._server else b"") + (
            self.without_server)


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


def error(status: int, date: DateCache, detail: str = "", extra: bytes = b"") -> bytes:
    """An error reply that always closes the connection."""
    phrase = http.HTTPStatus(status).phrase if status in STATUS_LINES else "Error"
    text = f"{status} {phrase}" + (f": {detail}" if detail else "") + "\n"
    return simple(status, text.encode(), date, keep_alive=False, extra=extra)
