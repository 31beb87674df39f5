"""HTTP/3 stacks side by side, in memory (no sockets): the server side of
aioquic 1.7 and of zttp's QuicEndpoint, both driven by the same aioquic
client, which also checks they interoperate. Prints requests per second and
the server's CPU per request (only the time spent inside the server stack).

    .venv/bin/python bench/h3_stacks.py [--requests N] [--concurrency C]

Needs aioquic (pip install aioquic); the client is the same for both, so the
difference is the server stack alone.
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import time
from collections.abc import Callable
from typing import Any

from aioquic.h3.connection import H3_ALPN
from aioquic.h3.connection import H3Connection as AioH3
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 443)
BODY = b"hello, world\n"


def _cert() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    return key, cert


class Server:
    """One server stack: feed a datagram, get datagrams back."""

    cpu = 0.0

    def receive(self, data: bytes, now_s: float) -> list[bytes]:
        raise NotImplementedError

    def tick(self, now_s: float) -> list[bytes]:
        """Run the server's timers (delayed ACKs, MAX_STREAMS) that are due."""
        return []


class AioquicServer(Server):
    def __init__(self, key: Any, cert: Any) -> None:
        self.config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        self.config.private_key = key
        self.config.certificate = cert
        self.quic: QuicConnection | None = None
        self.h3: AioH3 | None = None

    def receive(self, data: bytes, now_s: float) -> list[bytes]:
        t0 = time.process_time()
        if self.quic is None:
            from aioquic.buffer import Buffer
            from aioquic.quic.packet import pull_quic_header

            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            self.quic = QuicConnection(configuration=self.config,
                                       original_destination_connection_id=header.destination_cid)
            self.h3 = AioH3(self.quic)
        assert self.h3 is not None
        self.quic.receive_datagram(data, CLIENT_ADDR, now=now_s)
        while (event := self.quic.next_event()) is not None:
            for h3_event in self.h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    sid = h3_event.stream_id
                    self.h3.send_headers(sid, [(b":status", b"200"),
                                               (b"content-type", b"text/plain")])
                    self.h3.send_data(sid, BODY, end_stream=True)
        out = [d for d, _ in self.quic.datagrams_to_send(now=now_s)]
        self.cpu += time.process_time() - t0
        return out

    def tick(self, now_s: float) -> list[bytes]:
        if self.quic is None:
            return []
        t0 = time.process_time()
        timer = self.quic.get_timer()
        if timer is not None and timer <= now_s:
            self.quic.handle_timer(now_s)
        out = [d for d, _ in self.quic.datagrams_to_send(now=now_s)]
        self.cpu += time.process_time() - t0
        return out


class ZttpServer(Server):
    def __init__(self, key: Any, cert: Any, factory: Callable[[int], bytes] | None) -> None:
        import zttp

        creds: Any = {"certificate": cert.public_bytes(serialization.Encoding.DER),
                      # zttp takes a P-256 key as its raw 32-octet scalar
                      "private_key_scalar": key.private_numbers().private_value.to_bytes(
                          32, "big")}
        kwargs: dict[str, Any] = {"credentials": creds, "alpn": b"h3"}
        if factory is not None:
            kwargs["connection_id_factory"] = factory
        self.zttp = zttp
        self.endpoint = zttp.QuicEndpoint(**kwargs)

    def receive(self, data: bytes, now_s: float) -> list[bytes]:
        zttp = self.zttp
        t0 = time.process_time()
        now = int(now_s * 1_000_000)
        conn = self.endpoint.receive_datagram(data, b"client", now)
        if conn is not None:
            while True:
                event = conn.next_event()
                if event is zttp.NEED_DATA or event is zttp.CONNECTION_CLOSED:
                    break
                if isinstance(event, zttp.Request):
                    stream = conn.stream(event.stream_id)
                    stream.send_response(200, [(b"content-type", b"text/plain")])
                    stream.send_data(BODY)
                    stream.end_message()
        out = [d.data for d in self.endpoint.data_to_send()]
        self.cpu += time.process_time() - t0
        return out

    def tick(self, now_s: float) -> list[bytes]:
        t0 = time.process_time()
        self.endpoint.handle_timeout(int(now_s * 1_000_000))
        out = [d.data for d in self.endpoint.data_to_send()]
        self.cpu += time.process_time() - t0
        return out


class Terminated(Exception):
    pass


def one_connection(server: Server, requests: int, concurrency: int) -> float:
    """Run `requests` GETs on one new connection; return the seconds the
    requests took (after the handshake). Raises Terminated when the
    connection is closed first."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               verify_mode=ssl.CERT_NONE, server_name="localhost")
    client = QuicConnection(configuration=config)
    h3 = AioH3(client)
    now = time.monotonic()
    client.connect(SERVER_ADDR, now=now)
    done = sent = 0
    open_streams: set[int] = set()
    connected = False
    start = 0.0
    while done < requests:
        now = time.monotonic()
        for data, _ in client.datagrams_to_send(now=now):
            for reply in server.receive(data, now):
                client.receive_datagram(reply, SERVER_ADDR, now=now)
        while (event := client.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                connected = True
                start = time.perf_counter()
            elif isinstance(event, ConnectionTerminated):
                raise Terminated(f"after {done} requests: error 0x{event.error_code:x} "
                                 f"{event.reason_phrase!r}")
            for h3_event in h3.handle_event(event):
                if isinstance(h3_event, (HeadersReceived, DataReceived)) and h3_event.stream_ended:
                    open_streams.discard(h3_event.stream_id)
                    done += 1
        if connected:
            while len(open_streams) < concurrency and sent < requests:
                sid = client.get_next_available_stream_id()
                h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                      (b":authority", b"localhost"), (b":path", b"/")],
                                end_stream=True)
                open_streams.add(sid)
                sent += 1
        for reply in server.tick(now):
            client.receive_datagram(reply, SERVER_ADDR, now=now)
        timer = client.get_timer()
        if timer is not None and timer <= now:
            client.handle_timer(now)
    return time.perf_counter() - start


def run(make: Callable[[], Server], requests: int, per_connection: int,
        concurrency: int) -> str:
    elapsed = cpu = 0.0
    done = 0
    failures: list[str] = []
    while done < requests:
        server = make()  # one connection per server object: aioquic's is a connection
        try:
            elapsed += one_connection(server, per_connection, concurrency)
        except Terminated as exc:
            failures.append(str(exc))
            if len(failures) >= 3:
                break
            continue
        cpu += server.cpu
        done += per_connection
    if not done:
        return f"every connection failed: {failures[0]}"
    line = (f"{done / elapsed:9.0f} req/s (client included)  server "
            f"{cpu / done * 1e6:7.1f} us CPU/request ({per_connection} per connection)")
    if failures:
        line += f"; {len(failures)} connection(s) closed early, first {failures[0]}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--per-connection", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--no-dynamic-table", action="store_true",
                        help="keep the client's QPACK encoder off the dynamic table, "
                             "whatever capacity the server advertises (zttp 0.0.35 "
                             "advertises 4096 and has no setting for it)")
    args = parser.parse_args()
    if args.no_dynamic_table:
        import pylsqpack

        apply = pylsqpack.Encoder.apply_settings
        pylsqpack.Encoder.apply_settings = (  # type: ignore[method-assign]
            lambda self, max_table_capacity, blocked_streams: apply(
                self, max_table_capacity=0, blocked_streams=blocked_streams))
    key, cert = _cert()
    from zion.quic import cid

    servers: list[tuple[str, Callable[[], Server]]] = [
        ("aioquic 1.7 server", lambda: AioquicServer(key, cert)),
        ("zttp QuicEndpoint server", lambda: ZttpServer(key, cert, None)),
        ("zttp QuicEndpoint + zion CIDs", lambda: ZttpServer(key, cert, cid.factory(3, 1))),
    ]
    for name, make in servers:
        print(f"{name:30s} {run(make, args.requests, args.per_connection, args.concurrency)}")


if __name__ == "__main__":
    main()
