"""The server CID layout: what encode writes, parse reads back."""

from __future__ import annotations

import pytest

from zion.quic import cid


@pytest.mark.parametrize("slot,generation", [(0, 0), (1, 7), (255, 255), (17, 300)])
def test_round_trip(slot: int, generation: int) -> None:
    value = cid.encode(slot, generation)
    assert len(value) == cid.CID_LENGTH
    parsed = cid.parse(value)
    assert parsed == cid.ServerCid(slot, generation % 256)
    assert parsed.socket_index == (generation % cid.RING) * 256 + slot


def test_fixed_offsets_the_program_reads() -> None:
    value = cid.encode(9, 2, random=lambda n: bytes(range(0xE0, 0xE0 + n)))
    assert value[0] >> 5 == cid.CONFIG
    assert value[0] & 0x1F == 0xE0 & 0x1F
    assert value[1] == 2 and value[2] == 9
    assert value[3:] == bytes(range(0xE1, 0xE0 + cid.CID_LENGTH - 2))


def test_random_part_differs() -> None:
    seen = {cid.encode(3, 1)[3:] for _ in range(1000)}
    assert len(seen) == 1000


@pytest.mark.parametrize("value", [
    b"", bytes(8), bytes(cid.CID_LENGTH - 1), bytes(cid.CID_LENGTH + 1),
    bytes([0xE0]) + bytes(cid.CID_LENGTH - 1),  # config 0b111: not ours
    bytes([0x00]) + bytes(cid.CID_LENGTH - 1),
])
def test_not_ours(value: bytes) -> None:
    assert cid.parse(value) is None


@pytest.mark.parametrize("slot", [-1, 256])
def test_refuses_slots_no_cid_can_carry(slot: int) -> None:
    with pytest.raises(cid.CidError):
        cid.encode(slot, 0)
    with pytest.raises(cid.CidError):
        cid.factory(slot, 0)


def test_factory_checks_the_stacks_length() -> None:
    make = cid.factory(4, 1)
    assert cid.parse(make(cid.CID_LENGTH)) == cid.ServerCid(4, 1)
    with pytest.raises(cid.CidError):
        make(8)
