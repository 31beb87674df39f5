"""The floor: the least a uvloop TLS server can do per connection and request.

It is the floor issue 23 describes, and imports nothing of zion: two forked
processes (--workers 2, as every server here gets), one SO_REUSEPORT
listener each (as zion's workers), uvloop, one SSLContext made before fork
(so a session ticket resumes on either process) with zion's TLS settings
(TLS 1.2-1.3, ALPN, no compression, server cipher preference), and a
protocol that parses nothing: every blank line (the end of a request head)
is answered with the same response, a 13-byte body. One exception: a head
that says `connection: close` gets the same response with `connection:
close` and the connection is closed, because wrk opens a new connection
only when the response says so; without it the new-connection runs (wrk -H
'Connection: close') would measure keep-alive. No ASGI, no status board, no
timers. What zion spends above this per new connection or per request is
zion's own work.

    python floor_server.py --port P --workers N --cert C --key K
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys

import uvloop

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\n"
            b"Hello, world!")
CLOSING = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n"
           b"connection: close\r\n\r\nHello, world!")


class Floor(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end], buf[end + 4:]
            if b"connection: close" in head.lower():
                self.transport.write(CLOSING)  # type: ignore[attr-defined]
                self.transport.close()
                return
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]
        self.buf = buf


def context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(cert, key)
    return ctx


def serve(port: int, ctx: ssl.SSLContext) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(Floor, sock=sock, ssl=ctx,
                                          ssl_shutdown_timeout=2.0)
        await stop
        server.close()

    uvloop.run(main())


def run() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    ctx = context(a.cert, a.key)
    children = []
    for _ in range(a.workers):
        pid = os.fork()
        if pid == 0:
            serve(a.port, ctx)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children])
    for c in children:
        while True:
            try:
                os.waitpid(c, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    sys.exit(0)


if __name__ == "__main__":
    run()
