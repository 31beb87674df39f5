"""Server connection IDs that name the worker owning the connection. Pure.

A QUIC short header carries no connection ID length (RFC 9000 17.3), so the
kernel program can only find the destination connection ID of a 1-RTT
packet if every server CID has one fixed length. The worker's slot and its
generation sit at fixed offsets so bpf/zion_quic.c reads them with two loads;
the rest is random, so CIDs stay unpredictable (RFC 9000 5.1: an observer
must not guess the next one, and a stateless reset token is not derivable).

    octet 0      config (top 3 bits, QUIC-LB's "config rotation" bits;
                 0b111 is reserved there for "unroutable") | 5 random bits
    octet 1      generation % 256 (a reload starts a new one)
    octet 2      worker slot, 0..255
    octets 3..   random (CID_LENGTH - 3 = 13 octets, 104 bits)

The slot and generation are in clear: an on-path observer can tell which
worker owns a connection and link its CIDs by those two octets (RFC 9000 9.5
asks for unlinkable CIDs across a migration; QUIC-LB's encrypted modes are
the cure, and are not done).

The program's sockarray index for a CID is `socket_index(slot, generation)`:
the RING most recent generations each have their own 256 entries, so an old
generation's workers keep receiving their connections' packets on their own
sockets while the new generation takes the new connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

CID_LENGTH = 16  # zttp's QuicEndpoint takes 8..20
CONFIG = 0b001
CONFIG_SHIFT = 5
MAX_SLOTS = 256
# Generations routable at once: a reload's old workers keep theirs for at
# most the QUIC idle timeout, and more than RING - 1 reloads inside one idle
# timeout overwrite the oldest (its packets then go to the kernel hash).
RING = 4
SOCKARRAY_ENTRIES = RING * MAX_SLOTS


class CidError(ValueError):
    """A slot or generation that no CID can carry."""


@dataclass(frozen=True)
class ServerCid:
    slot: int
    generation: int  # modulo 256, as carried

    @property
    def socket_index(self) -> int:
        return socket_index(self.slot, self.generation)


def socket_index(slot: int, generation: int) -> int:
    """The sockarray index the program selects for a CID of this slot and
    generation (bpf/zion_quic.c computes the same from octets 1 and 2)."""
    if not 0 <= slot < MAX_SLOTS:
        raise CidError(f"slot {slot} is outside 0..{MAX_SLOTS - 1}")
    return (generation % RING) * MAX_SLOTS + slot


def encode(slot: int, generation: int, random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A new server CID for `slot` in `generation`."""
    if not 0 <= slot < MAX_SLOTS:
        raise CidError(f"slot {slot} is outside 0..{MAX_SLOTS - 1}")
    if generation < 0:
        raise CidError(f"generation {generation} is negative")
    noise = random(CID_LENGTH - 2)
    if len(noise) != CID_LENGTH - 2:
        raise CidError("the random source returned the wrong length")
    first = (CONFIG << CONFIG_SHIFT) | (noise[0] & 0x1F)
    return bytes((first, generation % 256, slot)) + noise[1:]


def parse(cid: bytes) -> ServerCid | None:
    """The slot and generation a CID names, or None when it is not one of
    ours (wrong length or config bits): a client-chosen Initial DCID, or a
    CID of another deployment's layout."""
    if len(cid) != CID_LENGTH or cid[0] >> CONFIG_SHIFT != CONFIG:
        return None
    return ServerCid(slot=cid[2], generation=cid[1])


def factory(slot: int, generation: int) -> Callable[[int], bytes]:
    """A connection-ID factory for a QUIC stack (zttp's QuicEndpoint calls it
    with the length it was configured with, which must be CID_LENGTH)."""
    socket_index(slot, generation)  # refuse a slot no CID can carry, now

    def make(length: int) -> bytes:
        if length != CID_LENGTH:
            raise CidError(f"server CIDs are {CID_LENGTH} octets, the stack asked for {length}")
        return encode(slot, generation)

    return make
