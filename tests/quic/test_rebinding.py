"""A real QUIC client that changes its UDP source port mid-connection, on the
real kernel: four UDP sockets in a reuseport group, each read by its own
zttp QuicEndpoint "worker" that takes its server CIDs from zion's layout
(cid.factory), and aioquic's HTTP/3 client. With bpf/zion_quic.c attached
every request of the connection reaches the worker that owns it whatever
the source port; with the kernel's hash the requests after a rebinding that
lands on another worker fail (that worker cannot decrypt them).

The workers run in this process (one select loop), not in zion's worker
processes: zion's workers do not serve HTTP/3 yet (docs/http3.md)."""

from __future__ import annotations

import datetime
import select
import socket
import ssl
import time
from typing import Any

import pytest

from tests.support.bpf import cannot_load_bpf
from zion.demux.shim import detach
from zion.quic import cid, steering
from zion.quic.policy import preflight_and_headers
from zion.quic.sockets import UdpGroup, bind_udp_group
from zion.settings import load_settings

aioquic = pytest.importorskip("aioquic", reason="needs aioquic (the test extra)")
zttp = pytest.importorskip("zttp")

from aioquic.h3.connection import H3_ALPN, H3Connection  # noqa: E402
from aioquic.h3.events import DataReceived, HeadersReceived  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.events import HandshakeCompleted  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))

WORKERS = 4


def _credentials() -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding

    # zttp takes a P-256 key as its raw scalar.
    return {"certificate": cert.public_bytes(Encoding.DER),
            "private_key_scalar": key.private_numbers().private_value.to_bytes(32, "big")}


class Workers:
    """One zttp QuicEndpoint per socket of the group, answering every
    HTTP/3 request with the number of the worker that served it."""

    def __init__(self, group: UdpGroup) -> None:
        creds = _credentials()
        self.group = group
        self.endpoints = [zttp.QuicEndpoint(credentials=creds, alpn=b"h3",
                                            connection_id_length=cid.CID_LENGTH,
                                            connection_id_factory=cid.factory(slot, 0))
                          for slot in range(len(group.sockets))]
        self.received = [0] * len(group.sockets)  # datagrams per worker socket
        # the client's source ports each worker socket received from
        self.sources: list[set[int]] = [set() for _ in group.sockets]

    def pump(self, ready: list[socket.socket], now_us: int) -> None:
        for slot, sock in enumerate(self.group.sockets):
            endpoint = self.endpoints[slot]
            if sock in ready:
                while True:
                    try:
                        data, (host, port) = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    self.received[slot] += 1
                    self.sources[slot].add(port)
                    conn = endpoint.receive_datagram(data, f"{host}|{port}".encode(), now_us)
                    if conn is not None:
                        self._answer(conn, slot)
            endpoint.handle_timeout(now_us)
            for out in endpoint.data_to_send():
                assert out.peer_address is not None
                host, port = out.peer_address.decode().split("|")
                sock.sendto(out.data, (host, int(port)))

    @staticmethod
    def _answer(conn: Any, slot: int) -> None:
        while True:
            event = conn.next_event()
            if event is zttp.NEED_DATA or event is zttp.CONNECTION_CLOSED:
                return
            if isinstance(event, zttp.Request):
                stream = conn.stream(event.stream_id)
                stream.send_response(200, [(b"content-type", b"text/plain")])
                stream.send_data(b"worker %d" % slot)
                stream.end_message()


class Client:
    """aioquic's HTTP/3 client on a UDP socket it can replace (a new source
    port: what a NAT rebinding looks like to the server)."""

    def __init__(self, port: int) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                   verify_mode=ssl.CERT_NONE, server_name="localhost")
        self.server = ("127.0.0.1", port)
        self.quic = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.quic)
        self.sock = self._new_socket()
        self.connected = False
        self.bodies: dict[int, bytes] = {}
        self.done: set[int] = set()
        self.quic.connect(self.server, now=time.monotonic())

    @staticmethod
    def _new_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    def rebind(self) -> int:
        self.sock.close()
        self.sock = self._new_socket()
        return int(self.sock.getsockname()[1])

    def get(self) -> int:
        sid = self.quic.get_next_available_stream_id()
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", b"localhost"), (b":path", b"/")],
                             end_stream=True)
        self.bodies[sid] = b""
        return sid

    def pump(self, ready: list[socket.socket], now: float) -> None:
        if self.sock in ready:
            while True:
                try:
                    data, addr = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                self.quic.receive_datagram(data, addr, now=now)
        timer = self.quic.get_timer()
        if timer is not None and timer <= now:
            self.quic.handle_timer(now)
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.connected = True
            for h3_event in self.h3.handle_event(event):
                if isinstance(h3_event, DataReceived):
                    self.bodies[h3_event.stream_id] += h3_event.data
                if isinstance(h3_event, (HeadersReceived, DataReceived)) and h3_event.stream_ended:
                    self.done.add(h3_event.stream_id)
        for data, addr in self.quic.datagrams_to_send(now=now):
            self.sock.sendto(data, addr)


def _run_until(workers: Workers, client: Client, condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        now = time.monotonic()
        if now > deadline:
            return False
        ready, _, _ = select.select([*workers.group.sockets, client.sock], [], [], 0.005)
        workers.pump(ready, int(time.monotonic() * 1_000_000))
        client.pump(ready, time.monotonic())
    return True


def _requests_across_rebindings(group: UdpGroup, count: int, wait: float
                                ) -> tuple[list[bytes | None], Workers, set[int]]:
    """One connection; before each request after the first the client moves
    to a new source port. The body of each answer (which worker), or None
    for a request that got no answer (the first within 10 s, before any
    rebinding; the others within `wait` s); the workers, with what each
    socket received; and the client's source ports."""
    workers = Workers(group)
    client = Client(group.port)
    ports = {int(client.sock.getsockname()[1])}
    assert _run_until(workers, client, lambda: client.connected, 10), "no handshake"
    answers: list[bytes | None] = []
    for n in range(count):
        if n:
            ports.add(client.rebind())
        sid = client.get()  # its datagrams leave from the new port at the next pump
        ok = _run_until(workers, client, lambda sid=sid: sid in client.done,
                        wait if n else 10)
        answers.append(client.bodies[sid] if ok else None)
    client.sock.close()
    return answers, workers, ports


def test_a_rebinding_client_stays_on_its_worker(state_dir) -> None:
    # The session's state directory: the merged kernel header tree is built
    # once per session there (a fresh one per test took over a minute of
    # `cp -rs` on a loaded machine).
    settings = load_settings(None, {"tls": {"state_dir": str(state_dir)}}, {})
    group = bind_udp_group("127.0.0.1", _free_udp_port(), socket.AF_INET, WORKERS)
    program = steering.load(steering.source_path().read_text(), group.sockets, 0, None,
                            2_000_000_000, preflight_and_headers(settings))
    try:
        program.attach(group.sockets[0])
        answers, workers, ports = _requests_across_rebindings(group, 8, wait=1.0)
        received = workers.received
        # Every datagram of the connection, from all eight source ports,
        # reached the one worker that owns it: zion's part (with the kernel's
        # hash, eight ports on one socket of four is a 1-in-16384 event).
        assert sorted(received)[:-1] == [0] * (WORKERS - 1), received
        slot = received.index(max(received))
        assert workers.sources[slot] == ports, (workers.sources, ports)
        owner = b"worker %d" % slot
        assert answers[0] == owner
        # Whether the QUIC stack answers after a migration is the stack's
        # part: zttp 0.0.35 + aioquic often leave those requests unanswered
        # although their packets reached the owner (counted above). The
        # answers that come are all from the owner.
        assert set(answers) - {None} == {owner}, answers
        assert program.stats()["by_cid"] > 8

        # The same on the kernel's hash: the 4-tuple changes, so does the
        # socket, and the worker that gets the packets cannot decrypt them.
        # Each new port hashes to the owner's socket one time in four: all
        # seven rebindings doing so is a 1-in-16384 event.
        detach(group.sockets[0])
        answers, workers, ports = _requests_across_rebindings(group, 8, wait=1.0)
        received = workers.received
        assert sum(1 for n in received if n) >= 2, received
        assert answers[0] is not None
        assert None in answers, answers
    finally:
        program.close()
        group.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
