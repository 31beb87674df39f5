"""File responses: the ASGI `http.response.pathsend` extension, and the body
of zion's own static files.

Two ways a file's bytes reach the client, chosen per connection:

- Plain HTTP/1.1 (--no-tls, UDS): sendfile(2) from the file to the socket.
  The bytes never pass through Python and zion holds no buffer for them; the
  kernel's socket buffer is the only one. uvloop implements no
  loop.sendfile() (it is AbstractEventLoop's NotImplementedError), and
  asyncio's waits without a deadline, so the socket is written directly
  once the transport's own buffer (the response head) is empty, on a dup()
  of its descriptor: uvloop refuses add_writer() on a descriptor a
  transport owns, and a second descriptor for the same socket is a separate
  epoll registration. A client that takes nothing for limits.send_timeout
  loses the connection, as a transport-written response does.
- TLS (Python's ssl has no kernel TLS) and HTTP/2 (frames, windows):
  _CHUNK bytes at a time through the connection's writer, each followed by
  its drain(), so a slow reader holds at most write_buffer_high (plus one
  chunk) per response, whatever the file's size.

A file that ends before the length the head announced ends the connection
(HTTP/2: resets the stream): the client must not take the next response's
bytes as this one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import TYPE_CHECKING, Any

from zion.log import get_logger

if TYPE_CHECKING:
    from zion.http.asgi_types import HTTPResponsePathsendEvent
    from zion.http.exchange import Exchange

log = get_logger("zion.http")

PATHSEND = "http.response.pathsend"
# 64 KiB: one zttp flush (h2.py's _FLUSH_HIGH) and four TLS records. Read
# from the page cache it takes ~10 us, so it runs on the loop; from the disk
# ~200 us on average and up to ~18 ms (measured on this VM's virtio disk), so
# a chunk not all cached is read in a thread (_read).
_CHUNK = 65536
# The most one sendfile(2) call may move before the loop serves others: a
# reader as fast as loopback would otherwise hold the loop for a whole file.
_SENDFILE_STEP = 1 << 20
# While the socket is full, how often the wait looks whether the connection
# is still ours (it may be closed under us, and the dup keeps it writable
# to nobody).
_POLL = 1.0


class PathsendError(RuntimeError):
    """The app's pathsend cannot be served (not an absolute path, missing, not
    a regular file, a length that is not the file's). Raised into the app's
    send(): a RuntimeError, not an OSError, which ASGI 2.4 reserves for a
    client that left."""


async def pathsend(ex: Exchange, message: HTTPResponsePathsendEvent) -> None:
    """Answer with the file `message["path"]` names, after the app's
    http.response.start (its status and headers). Errors are raised before
    the head is written, so the app fails with nothing on the wire (a 500)."""
    path = message.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise PathsendError(f"pathsend needs an absolute path, not {path!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PathsendError(f"pathsend cannot open {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PathsendError(f"pathsend {path!r} is not a regular file")
        headers = ex.headers = list(ex.headers)
        length = _declared(headers)
        if length is None:
            length = st.st_size
            headers.append((b"content-length", b"%d" % length))
        elif length != st.st_size:
            raise PathsendError(f"pathsend {path!r}: content-length {length}, "
                                f"file {st.st_size} bytes")
        ex._start(b"", False)  # the head, as for a first body message
        if length and not ex.bodyless and not await send_file(ex, fd, 0, length):
            if not ex.disconnected:
                raise PathsendError(f"pathsend {path!r} shrank while being sent")
            return
        if not ex.disconnected and not ex.want_trailers:  # else the app's trailers end it
            if not ex.bodyless:
                ex.conn.send_body(b"", True)
            ex.complete()
    finally:
        os.close(fd)


def _declared(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise PathsendError(f"invalid content-length {value!r}") from None
    return None


async def send_file(ex: Exchange, fd: int, offset: int, count: int) -> bool:
    """`count` bytes of `fd` from `offset` as the body whose head is sent.
    False when they could not all go: the client left, or the file ended
    first (then the connection is closed here)."""
    transport = _plain_transport(ex)
    if transport is not None:
        return await _sendfile(ex, transport, fd, offset, count)
    return await _stream(ex, fd, offset, count)


def _plain_transport(ex: Exchange) -> Any:
    """The HTTP/1.1 connection's transport when nothing stands between its
    socket and the client; None over TLS and for HTTP/2 streams (which
    carry no transport of their own)."""
    transport = getattr(ex.conn, "transport", None)
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    if transport.get_extra_info("socket") is None:
        return None
    return transport


async def _stream(ex: Exchange, fd: int, offset: int, count: int) -> bool:
    conn = ex.conn
    loop = conn.loop
    end = offset + count
    # A larger readahead window: fewer chunks find the disk (cold 100 MiB: 44
    # instead of 200 us per chunk on average).
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_SEQUENTIAL)
    while offset < end:
        if ex.disconnected:
            return False
        size = min(_CHUNK, end - offset)
        chunk = _cached(fd, size, offset)
        if chunk is None:
            # The thread reads (and closes) its own descriptor, shielded: a
            # cancelled response closes ours at once, while the read may not
            # have started or still be on the disk.
            chunk = await asyncio.shield(
                loop.run_in_executor(None, _pread_own, os.dup(fd), size, offset))
        if not chunk:
            conn.close()  # shorter than announced
            return False
        ex.write_raw(chunk)
        offset += len(chunk)
        # The connection's back-pressure (and its send_timeout) paces us.
        await conn.drain()
    return not ex.disconnected


def _cached(fd: int, size: int, offset: int) -> bytes | None:
    """`size` bytes at `offset` if the page cache holds them all, without
    blocking (preadv2 RWF_NOWAIT, Linux 4.14); None when the disk is needed
    (or the file ends first: the thread's read says so)."""
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError:  # EOPNOTSUPP: a file system without RWF_NOWAIT
        return os.pread(fd, size, offset)
    return bytes(buf) if got == size else None


def _pread_own(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


async def _sendfile(ex: Exchange, transport: Any, fd: int, offset: int, count: int) -> bool:
    conn = ex.conn
    loop = conn.loop
    timeout = conn.state.limits.send_timeout
    counters = conn.state.counters
    sock = os.dup(transport.get_extra_info("socket").fileno())
    try:
        # The head went through the transport: it leaves first.
        while transport.get_write_buffer_size():
            if not await _writable(ex, loop, sock, timeout):
                return _give_up(ex)
        end = offset + count
        while offset < end:
            if ex.disconnected:
                return False
            try:
                sent = os.sendfile(sock, fd, offset, min(end - offset, _SENDFILE_STEP))
            except BlockingIOError:
                if not await _writable(ex, loop, sock, timeout):
                    return _give_up(ex)
                continue
            except OSError:
                conn.close()  # the peer is gone (EPIPE, ECONNRESET)
                return False
            if not sent:
                conn.close()  # the file is shorter than announced
                return False
            offset += sent
            ex.written += sent  # the access log's body bytes
            counters.sendfile_bytes += sent
            await asyncio.sleep(0)  # the loop's other clients, between steps
        return True
    finally:
        os.close(sock)


def _give_up(ex: Exchange) -> bool:
    if not ex.disconnected:
        # Not close(): it would wait to flush to a client that does not read.
        abort = getattr(ex.conn, "abort", ex.conn.close)
        abort()
    return False


async def _writable(ex: Exchange, loop: asyncio.AbstractEventLoop, sock: int,
                    timeout: float) -> bool:
    """True once the socket takes bytes again; False after `timeout` seconds
    without, or once the connection is no longer this response's."""
    deadline = loop.time() + timeout
    while not ex.disconnected:
        left = deadline - loop.time()
        if left <= 0:
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        loop.add_writer(sock, _settle, waiter, True)
        timer = loop.call_later(min(left, _POLL), _settle, waiter, False)
        try:
            if await waiter:
                return True
        finally:
            timer.cancel()
            loop.remove_writer(sock)
    return False


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
