"""PROXY protocol headers as balancers write them, and a client that writes
one before its TLS handshake, for tests."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import Any

from tests.conftest import client_context, close, read_response
from zion.proxy import V2_SIGNATURE

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v2(command: int = 0x1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"",
       length: int | None = None, version: int = 0x2) -> bytes:
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v1(src: str, sport: int, proto: str = "TCP4", dst: str = "192.0.2.1") -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} 443\r\n".encode()


def raw_socket(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


async def ask(sock: socket.socket, path: str = "/", ctx: ssl.SSLContext | None = None,
              plain: bool = False) -> Any:
    """One GET over `sock` (TLS unless plain), once the test wrote its header."""
    reader, writer = await asyncio.open_connection(
        sock=sock, **({} if plain else {"ssl": ctx or client_context(),
                                         "server_hostname": "localhost"}))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        resp = await asyncio.wait_for(read_response(reader), 10)
        return resp.json() if resp.status == 200 else resp
    finally:
        await close(writer)
