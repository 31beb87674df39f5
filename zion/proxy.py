"""PROXY protocol v1 and v2 headers: a strict, bounded parser.

The reference is HAProxy's doc/proxy-protocol.txt. A balancer (HAProxy
`send-proxy`/`send-proxy-v2`, AWS NLB, GCP TCP proxy) writes one header as
the very first bytes of a connection, before the TLS ClientHello, naming the
client it accepted the connection from.

`parse` takes the bytes received so far and returns the header, None while
the bytes are a valid beginning of one, or raises ProxyProtocolError. It
never looks past the header: `ProxyHeader.length` says where the next
protocol (TLS or HTTP) begins, so a caller that reads with MSG_PEEK can take
exactly the header off the socket and leave the ClientHello to TLS.

Nothing from the rest of zion is imported here (the parser is fuzzed alone).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import Enum

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
# Spec 2.1: "a receiver may ... never read more than 107 characters" (the
# longest TCP6 line with its CRLF).
V1_MAX_LENGTH = 107
# Spec 2.2: the 16-byte fixed part, then `len` bytes of addresses and TLVs.
_V2_FIXED = 16
# The length field allows 65535; real balancers send far less (AWS NLB: an
# endpoint id, HAProxy send-proxy-v2-ssl: a few TLS facts). A bound keeps one
# connection from holding 64 KiB before it is known to be anything.
V2_MAX_LENGTH = _V2_FIXED + 4096
MAX_LENGTH = max(V1_MAX_LENGTH, V2_MAX_LENGTH)

# Spec 2.2, the 14th byte: address family (high nibble), transport (low).
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_TRANSPORTS = (0x0, 0x1, 0x2)  # UNSPEC, STREAM, DGRAM


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header (of an accepted version)."""


class Command(Enum):
    # v2 LOCAL: the balancer's own connection (a health check); v1 has none.
    LOCAL = 0x0
    PROXY = 0x1


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    command: Command
    # The original client and the address it connected to; None for LOCAL,
    # v1 UNKNOWN and v2 UNSPEC/UNIX, where the real peer is to be used.
    source: Address | None
    destination: Address | None
    length: int  # bytes the header takes at the start of the stream
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes, *, v1: bool = True, v2: bool = True) -> ProxyHeader | None:
    """The header at the start of `data`; None if `data` is a proper prefix of
    one (read more); ProxyProtocolError if it cannot become one."""
    if not (v1 or v2):
        raise ValueError("accept at least one version")
    if not data:
        return None
    if v2 and data[0] == V2_SIGNATURE[0]:
        if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
            raise ProxyProtocolError("v2 header: bad signature")
        return _parse_v2(data)
    if v1 and data[0] == _V1_PREFIX[0]:
        if not _V1_PREFIX.startswith(data[:len(_V1_PREFIX)]):
            raise ProxyProtocolError("v1 header: does not start with 'PROXY '")
        return None if len(data) < len(_V1_PREFIX) else _parse_v1(data)
    wanted = " or ".join(v for v, on in (("v1", v1), ("v2", v2)) if on)
    raise ProxyProtocolError(f"no PROXY protocol {wanted} header at the start of the "
                             "connection")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:V1_MAX_LENGTH]
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf >= 0 and (cr < 0 or lf < cr):
        raise ProxyProtocolError("v1 header line not ended by CRLF")
    if cr < 0 or cr == len(window) - 1:
        # No CR yet, or a CR whose LF has not arrived.
        if len(window) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
        return None
    if window[cr + 1] != 0x0A:
        raise ProxyProtocolError("v1 header line not ended by CRLF")
    line = window[len(_V1_PREFIX):cr]
    length = cr + 2
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # Spec 2.1: with UNKNOWN the rest of the line is to be ignored.
        return ProxyHeader(1, Command.PROXY, None, None, length)
    fields = line.split(b" ")
    if len(fields) != 5:
        raise ProxyProtocolError("v1 header needs PROTO SRC DST SRCPORT DSTPORT, single "
                                 "spaces")
    proto, src, dst, sport, dport = fields
    if proto == b"TCP4":
        version = 4
    elif proto == b"TCP6":
        version = 6
    else:
        raise ProxyProtocolError("v1 protocol must be TCP4, TCP6 or UNKNOWN")
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(1, Command.PROXY, source, destination, length)


def _v1_address(raw: bytes, version: int) -> str:
    # inet_pton is strict where inet_aton is not: four decimal octets, no
    # leading zeroes, no zone index; inet_ntop gives the canonical text.
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError, OSError):
        raise ProxyProtocolError(f"v1 header: bad IPv{version} address") from None


def _v1_port(raw: bytes) -> int:
    # Spec 2.1: decimal 0..65535, without leading zeroes.
    if not raw.isdigit() or not raw.isascii() or len(raw) > 5 or (
            len(raw) > 1 and raw[0:1] == b"0"):
        raise ProxyProtocolError("v1 header: bad port")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError("v1 header: bad port")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    ver_cmd, fam, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4}, expected 2")
    try:
        command = Command(ver_cmd & 0xF)
    except ValueError:
        raise ProxyProtocolError(f"v2 header: unknown command {ver_cmd & 0xF}") from None
    total = _V2_FIXED + length
    if total > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"v2 header of {total} bytes, more than the "
                                 f"{V2_MAX_LENGTH} accepted")
    family, transport = fam >> 4, fam & 0xF
    if family not in _ADDRESS_LENGTH or transport not in _TRANSPORTS:
        raise ProxyProtocolError(f"v2 header: unknown address family/protocol 0x{fam:02x}")
    if command is Command.PROXY and length < _ADDRESS_LENGTH[family]:
        raise ProxyProtocolError("v2 header: address block shorter than its family needs")
    if len(data) < total:
        return None
    body = data[_V2_FIXED:total]
    if command is Command.LOCAL:
        # Spec 2.2: for LOCAL the receiver must ignore the address block, and
        # use the real connection endpoints.
        return ProxyHeader(2, command, None, None, total)
    source = destination = None
    # inet_ntop, not ipaddress: a fifth of the cost, on every connection.
    if family == _AF_INET:
        source = (socket.inet_ntop(socket.AF_INET, body[0:4]), int.from_bytes(body[8:10], "big"))
        destination = (socket.inet_ntop(socket.AF_INET, body[4:8]),
                       int.from_bytes(body[10:12], "big"))
    elif family == _AF_INET6:
        source = (socket.inet_ntop(socket.AF_INET6, body[0:16]),
                  int.from_bytes(body[32:34], "big"))
        destination = (socket.inet_ntop(socket.AF_INET6, body[16:32]),
                       int.from_bytes(body[34:36], "big"))
    tlvs = _tlvs(body[_ADDRESS_LENGTH[family]:])
    return ProxyHeader(2, command, source, destination, total, tlvs)


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """Spec 2.2.1: type (1 byte), length (2 bytes), value; each must fit."""
    out = []
    at = 0
    while at < len(block):
        if at + 3 > len(block):
            raise ProxyProtocolError("v2 header: truncated TLV")
        kind, size = block[at], int.from_bytes(block[at + 1:at + 3], "big")
        if at + 3 + size > len(block):
            raise ProxyProtocolError("v2 header: TLV longer than the header")
        out.append((kind, block[at + 3:at + 3 + size]))
        at += 3 + size
    return tuple(out)
