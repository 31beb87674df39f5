"""Static files under a root: content types, ETag/Last-Modified with 304,
single byte ranges, and no way out of the root (symlinks included)."""

from __future__ import annotations

import asyncio
import mimetypes
import os
import stat
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING

from zion.handlers.builtins import ALLOW_GET
from zion.http import files

if TYPE_CHECKING:
    from zion.http.exchange import Exchange


class StaticFiles:
    def __init__(self, root: str, tasks: set[asyncio.Task[None]]) -> None:
        self.root = os.path.realpath(root)
        self.tasks = tasks  # the worker's: keeps file copies referenced until done

    def resolve(self, url_path: str) -> str | None:
        """The file a URL path names, or None if it is outside root or missing."""
        if "\x00" in url_path:
            return None
        candidate = os.path.realpath(os.path.join(self.root, url_path.lstrip("/")))
        if candidate != self.root and not candidate.startswith(self.root + os.sep):
            return None
        if os.path.isdir(candidate):
            candidate = os.path.join(candidate, "index.html")
        return candidate if os.path.isfile(candidate) else None

    def wants(self, ex: Exchange, has_app: bool) -> bool:
        # With an app, only paths that exist are ours; without one, all are.
        if not has_app:
            return True
        method = ex.scope["method"]
        return method in ("GET", "HEAD") and self.resolve(ex.scope["path"]) is not None

    def serve(self, ex: Exchange) -> None:
        if ex.scope["method"] not in ("GET", "HEAD"):
            ex.respond(405, b"405 Method Not Allowed\n", extra=ALLOW_GET)
            return
        path = self.resolve(ex.scope["path"])
        if path is None:
            ex.respond(404, b"404 Not Found\n")
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            ex.respond(404, b"404 Not Found\n")
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            ex.respond(404, b"404 Not Found\n")
            return
        task = ex.conn.loop.create_task(_send_file(ex, fd, path, st))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _not_modified(headers: list[tuple[bytes, bytes]], etag: bytes, mtime: int) -> bool:
    inm = _header(headers, b"if-none-match")
    if inm is not None:
        tags = [t.strip() for t in inm.split(b",")]
        return etag in tags or b"*" in tags or b"W/" + etag in tags
    ims = _header(headers, b"if-modified-since")
    if ims is not None:
        try:
            return int(parsedate_to_datetime(ims.decode("latin-1")).timestamp()) >= mtime
        except (TypeError, ValueError):
            return False
    return False


def parse_range(value: bytes, size: int) -> tuple[int, int] | bool | None:
    """One `bytes=a-b` range -> (start, end inclusive); None = ignore the
    header (serve all); False = unsatisfiable (416)."""
    text = value.decode("latin-1").strip()
    if not text.startswith("bytes=") or "," in text:
        return None  # multiple ranges: serve the whole file, as allowed
    spec = text[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return False
            return (max(0, size - length), size - 1) if size else False
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or start >= size or end < start:
        return False
    return start, min(end, size - 1)


async def _send_file(ex: Exchange, fd: int, path: str, st: os.stat_result) -> None:
    try:
        await _send_file_inner(ex, fd, path, st)
    finally:
        os.close(fd)


async def _send_file_inner(ex: Exchange, fd: int, path: str, st: os.stat_result) -> None:
    mtime = int(st.st_mtime)
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'.encode()
    ctype, _encoding = mimetypes.guess_type(path)
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    common = [(b"etag", etag),
              (b"last-modified", formatdate(mtime, usegmt=True).encode()),
              (b"accept-ranges", b"bytes")]
    headers = ex.scope["headers"]
    if _not_modified(headers, etag, mtime):
        ex.send_head(304, common, 0)
        ex.complete()
        return
    size = st.st_size
    start, end, status = 0, size - 1, 200
    extra: list[tuple[bytes, bytes]] = []
    rng = _header(headers, b"range")
    if rng is not None and _header(headers, b"if-range") in (None, etag):
        parsed = parse_range(rng, size)
        if parsed is False:
            ex.respond(416, b"416 Range Not Satisfiable\n",
                       extra=((b"content-range", b"bytes */%d" % size),))
            return
        if isinstance(parsed, tuple):
            start, end = parsed
            status = 206
            extra = [(b"content-range", b"bytes %d-%d/%d" % (start, end, size))]
    length = end - start + 1 if size else 0
    ex.send_head(status, [*common, *extra, (b"content-type", ctype.encode())], length)
    # The same body path as an app's pathsend: sendfile(2) on plain HTTP/1.1,
    # bounded chunks with back-pressure over TLS and HTTP/2 (http/files.py).
    if length and not ex.head:
        await files.send_file(ex, fd, start, length)  # False: it closed the connection
    ex.complete()
