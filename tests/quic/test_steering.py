"""bpf/zion_quic.c on the real kernel: a UDP reuseport group of plain
sockets, the program attached, crafted datagrams sent from client sockets on
many source ports; each test asserts which socket of the group received each
datagram."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.quic import packets
from tests.support.bpf import cannot_load_bpf
from zion.demux import policy
from zion.demux.board import SlotState
from zion.demux.shim import detach
from zion.listeners import ListenerGroup
from zion.quic import cid, steering
from zion.quic.policy import preflight_and_headers
from zion.quic.sockets import UdpGroup, bind_udp, bind_udp_group
from zion.quic.steering import QuicProgram, QuicStat
from zion.settings import load_settings

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))

STALL_NS = 2_000_000_000


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return int(port)


def _kernel_source(state_dir) -> str | None:
    settings = load_settings(None, {"tls": {"state_dir": str(state_dir)}}, {})
    return preflight_and_headers(settings)


@contextmanager
def _steered(state_dir, count: int = 3, slots_fd: int | None = None,
             port: int | None = None) -> Iterator[tuple[UdpGroup, QuicProgram]]:
    group = bind_udp_group("127.0.0.1", port or _free_port(), socket.AF_INET, count)
    program = steering.load(steering.source_path().read_text(), group.sockets, 0, slots_fd,
                            STALL_NS, _kernel_source(state_dir))
    try:
        program.attach(group.sockets[0])
        yield group, program
    finally:
        program.close()
        group.close()


def _send(port: int, datagrams: list[bytes], new_port_each: bool = True) -> None:
    """Send each datagram from its own client socket (a new source port: a
    new 4-tuple hash), or all from one."""
    one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for data in datagrams:
            if new_port_each:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.sendto(data, ("127.0.0.1", port))
            else:
                one.sendto(data, ("127.0.0.1", port))
    finally:
        one.close()


def _receive(socks: tuple[socket.socket, ...], expected: int,
             timeout: float = 5.0) -> list[list[bytes]]:
    """Each socket's datagrams, once `expected` have arrived in all."""
    got: list[list[bytes]] = [[] for _ in socks]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < expected:
        left = deadline - time.monotonic()
        assert left > 0, f"only {sum(map(len, got))} of {expected} datagrams arrived"
        ready, _, _ = select.select(socks, [], [], left)
        for sock in ready:
            got[socks.index(sock)].append(sock.recv(65535))
    return got


def _where(got: list[list[bytes]], marker: bytes) -> list[int]:
    return [i for i, datagrams in enumerate(got) for d in datagrams if marker in d]


def _marker(n: int) -> bytes:
    return b"<m%05d>" % n


def test_server_cid_reaches_its_slot_from_any_source_port(state_dir) -> None:
    with _steered(state_dir, 4) as (group, program):
        sent = []
        for slot in range(4):
            server_cid = cid.encode(slot, 0)
            for n in range(8):  # eight source ports: a client rebinding seven times
                sent.append((slot, _marker(slot * 100 + n), server_cid))
        # The 1-RTT packets, then Handshake packets to the same CIDs.
        datagrams = [packets.short(c, m) for _, m, c in sent]
        datagrams += [packets.long(2, c, m + b"hs", size=60) for _, m, c in sent]
        _send(group.port, datagrams)
        got = _receive(group.sockets, len(datagrams))
        for slot, marker, _ in sent:
            assert _where(got, marker) == [slot, slot]
        assert program.stats()["by_cid"] == len(datagrams)


def test_kernel_hash_splits_a_rebinding_client(state_dir) -> None:
    """What the program prevents: with no program the kernel's reuseport
    hash spreads one connection's packets (one CID, twenty source ports) over
    the group, so most reach a worker that does not know the connection."""
    with _steered(state_dir, 4) as (group, _program):
        server_cid = cid.encode(2, 0)
        datagrams = [packets.short(server_cid, _marker(n)) for n in range(20)]
        _send(group.port, datagrams)
        assert [len(d) for d in _receive(group.sockets, 20)] == [0, 0, 20, 0]
        detach(group.sockets[0])
        _send(group.port, datagrams)
        spread = [len(d) for d in _receive(group.sockets, 20)]
        assert spread[2] < 20 and sum(1 for n in spread if n) >= 2, spread


def test_both_initials_of_a_handshake_reach_one_socket(state_dir) -> None:
    """A post-quantum ClientHello spans two Initials; a client may send the
    second (and its 0-RTT) from another source port. Each DCID's packets
    land together, whichever socket the first one chose."""
    with _steered(state_dir, 4) as (group, program):
        dcids = [os.urandom(8 + n % 13) for n in range(40)]
        first = [packets.initial(d, _marker(n)) for n, d in enumerate(dcids)]
        second = [packets.initial(d, _marker(n) + b"2nd") for n, d in enumerate(dcids)]
        zero_rtt = [packets.long(1, d, _marker(n) + b"0rtt", size=80)
                    for n, d in enumerate(dcids)]
        _send(group.port, first)
        _send(group.port, second + zero_rtt)
        got = _receive(group.sockets, 3 * len(dcids))
        homes = []
        for n in range(len(dcids)):
            where = _where(got, _marker(n))
            assert len(where) == 3 and len(set(where)) == 1, (n, where)
            homes.append(where[0])
        assert len(set(homes)) > 1, "with every worker idle, new handshakes spread"
        stats = program.stats()
        assert stats["initial_new"] == 40 and stats["initial_seen"] == 80


def test_unknown_datagrams_go_by_the_hash_never_dropped(state_dir) -> None:
    with _steered(state_dir, 3) as (group, program):
        junk = [
            b"",                                    # an empty datagram
            b"\x41",                                # a short header cut short
            b"\x41" + os.urandom(4),
            bytes([0x40]) + bytes([0xE0]) + os.urandom(40),   # config bits not ours
            packets.long(0, os.urandom(8), b"", version=0xFACEB00C),  # unknown version
            packets.long(0, os.urandom(8), b"", version=0),   # version negotiation
            packets.long(0, os.urandom(4), b""),    # Initial DCID under 8 octets
            packets.long(2, os.urandom(8), b"", size=60),  # Handshake, unknown DCID
            b"\xc0\x00\x00\x00\x01\x14",            # a long header cut in its DCID
            os.urandom(1400),
        ]
        _send(group.port, junk * 3)
        got = _receive(group.sockets, len(junk) * 3)
        assert sum(map(len, got)) == len(junk) * 3
        assert program.stats()["pass"] >= len(junk) * 3 - 3  # random bytes may parse


def test_server_cid_of_an_absent_socket_goes_by_the_hash(state_dir) -> None:
    with _steered(state_dir, 3) as (group, program):
        gone = [cid.encode(7, 0), cid.encode(1, 3)]  # slot 7, generation 3: no socket
        _send(group.port, [packets.short(c, b"x") for c in gone])
        assert sum(map(len, _receive(group.sockets, 2))) == 2
        assert program.stats()["no_socket"] == 2


def _tcp_group(port: int, count: int) -> ListenerGroup:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        socks.append(sock)
    return ListenerGroup(tuple(socks), "127.0.0.1", port, socket.AF_INET)


def test_first_initial_goes_to_the_least_loaded_healthy_worker(state_dir) -> None:
    """The Initial's first sight reads the TCP demux's status board: the
    least-loaded live worker wins, and a stalled one gets nothing."""
    port = _free_port()
    settings = load_settings(None, {"server": {"workers": 3},
                                    "tls": {"state_dir": str(state_dir)}}, {})
    tcp = _tcp_group(port, 3)
    demux = policy.setup(settings, tcp)
    assert demux.routing and demux.program is not None and demux.board is not None
    board = demux.board
    try:
        with _steered(state_dir, 3, demux.program.slots_fd, port) as (group, program):
            now = time.monotonic_ns()
            for slot, conns in enumerate((5, 2, 9)):
                board.set_state(slot, SlotState.READY, pid=1)
                board.slots[slot].heartbeat_ns = now
                board.slots[slot].conns = conns
            _send(port, [packets.initial(os.urandom(8), _marker(n)) for n in range(20)])
            assert [len(d) for d in _receive(group.sockets, 20)] == [0, 20, 0]

            # Slot 1 stalls (its heartbeat stops) though it has no load; slot 2
            # is draining: every new connection goes to slot 0.
            board.slots[1].conns = 0
            board.slots[1].heartbeat_ns = now - 3 * STALL_NS
            board.set_state(2, SlotState.DRAINING)
            board.slots[0].heartbeat_ns = time.monotonic_ns()
            _send(port, [packets.initial(os.urandom(8), _marker(n)) for n in range(20)])
            assert [len(d) for d in _receive(group.sockets, 20)] == [20, 0, 0]

            # No healthy worker: the hash, still never a drop.
            board.set_state(0, SlotState.DRAINING)
            _send(port, [packets.initial(os.urandom(8), _marker(n)) for n in range(6)])
            assert sum(map(len, _receive(group.sockets, 6))) == 6
            assert program.stats()["no_worker"] == 6
    finally:
        demux.close()
        tcp.close()


def test_a_new_generation_takes_new_connections_the_old_keeps_its_own(state_dir) -> None:
    with _steered(state_dir, 2) as (old, program):
        new = [bind_udp("127.0.0.1", old.port, socket.AF_INET) for _ in range(2)]
        try:
            for slot, sock in enumerate(new):
                program.set_socket(slot, 1, sock)
            program.set_generation(1)
            everyone = old.sockets + tuple(new)
            datagrams = [packets.initial(os.urandom(8), _marker(n)) for n in range(10)]
            datagrams += [packets.short(cid.encode(n % 2, 0), _marker(100 + n))
                          for n in range(10)]
            datagrams += [packets.short(cid.encode(n % 2, 1), _marker(200 + n))
                          for n in range(10)]
            _send(old.port, datagrams)
            got = _receive(everyone, 30)
            for n in range(10):
                assert _where(got, _marker(n))[0] in (2, 3)  # new connections: generation 1
                assert _where(got, _marker(100 + n)) == [n % 2]  # old CIDs: old sockets
                assert _where(got, _marker(200 + n)) == [2 + n % 2]
        finally:
            for sock in new:
                sock.close()


def test_the_verifier_takes_256_workers(state_dir) -> None:
    port = _free_port()
    settings = load_settings(None, {"server": {"workers": 256},
                                    "tls": {"state_dir": str(state_dir)}}, {})
    tcp = _tcp_group(port, 256)
    demux = policy.setup(settings, tcp)
    try:
        assert demux.routing and demux.program is not None
        with _steered(state_dir, 256, demux.program.slots_fd, port) as (group, program):
            _send(port, [packets.short(cid.encode(255, 0), b"last")])
            assert [i for i, d in enumerate(_receive(group.sockets, 1)) if d] == [255]
            assert program.stats()[QuicStat.BY_CID.name.lower()] == 1
    finally:
        demux.close()
        tcp.close()


def test_dual_stack_group_steers_ipv6_and_ipv4_mapped(state_dir) -> None:
    """Bound to "::" with IPV6_V6ONLY off: the program reads the same
    offsets (the skb's data is at the UDP header for both families)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    group = bind_udp_group("::", port, socket.AF_INET6, 3)
    program = steering.load(steering.source_path().read_text(), group.sockets, 0, None,
                            STALL_NS, _kernel_source(state_dir))
    try:
        program.attach(group.sockets[0])
        sent = 0
        for family, address in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            for slot in range(3):
                with socket.socket(family, socket.SOCK_DGRAM) as client:
                    client.sendto(packets.short(cid.encode(slot, 0), _marker(slot)),
                                  (address, port))
                    sent += 1
        got = _receive(group.sockets, sent)
        for slot in range(3):
            assert _where(got, _marker(slot)) == [slot, slot]
    finally:
        program.close()
        group.close()
