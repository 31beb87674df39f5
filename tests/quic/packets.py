"""Crafted QUIC datagrams (RFC 9000 17) for the steering tests: only the
header octets the kernel program reads are real; the rest is filler."""

from __future__ import annotations

import os

V1 = 0x00000001


def short(dcid: bytes, marker: bytes) -> bytes:
    """A 1-RTT packet: form bit 0, fixed bit 1, the DCID with no length."""
    return bytes([0x40 | 0x01]) + dcid + marker + os.urandom(24)


def long(packet_type: int, dcid: bytes, marker: bytes, version: int = V1,
         scid: bytes = b"\x11" * 8, size: int = 1200) -> bytes:
    """A long header packet of `packet_type` (v1: 0 Initial, 1 0-RTT, 2
    Handshake), padded to `size` as a client pads its Initials."""
    head = (bytes([0xC0 | packet_type << 4 | 0x03]) + version.to_bytes(4, "big")
            + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid)
    if packet_type == 0:
        head += b"\x00"  # token length
    body = marker
    return head + body + bytes(max(0, size - len(head) - len(body)))


def initial(dcid: bytes, marker: bytes) -> bytes:
    return long(0, dcid, marker)
