"""Response bytes: status lines, the cached Date/Server prefix, simple replies."""

from __future__ import annotations

import http
from collections.abc import Sequence
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

    __slots__ = ("prefix", "without_server", "pairs", "pairs_without_server", "_server",
                 "_date", "_extra", "_extra_pairs")

    def __init__(self, server: bool = True, date: bool = True,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._server = server
        self._date = date
        self._extra = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
        self._extra_pairs = list(extra)
        self.prefix = self.without_server = b""
        # The same as header pairs, for HTTP/2 (which has no header lines).
        self.pairs: list[tuple[bytes, bytes]] = []
        self.pairs_without_server: list[tuple[bytes, bytes]] = []
        self.refresh()

    def add(self, name: bytes, value: bytes) -> None:
        """One more default header, from now on (the worker's Alt-Svc)."""
        self._extra += name + b": " + value + b"\r\n"
        self._extra_pairs.append((name, value))
        self.refresh()

    def refresh(self) -> None:
        now = formatdate(usegmt=True).encode()
        date = b"date: " + now + b"\r\n" if self._date else b""
        self.without_server = date + self._extra
        self.prefix = (b"server: " + SERVER_NAME + b"\r\n" if self._server else b"") + (
            self.without_server)
        self.pairs_without_server = ([(b"date", now)] if self._date else []) + self._extra_pairs
        self.pairs = ([(b"server", SERVER_NAME)] if self._server else []) + (
            self.pairs_without_server)


def header_lines(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Header pairs as HTTP/1.1 lines (zion's own names and values: no CR/LF)."""
    return b"".join(n + b": " + v + b"\r\n" for n, v in pairs)


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
