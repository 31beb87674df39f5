"""zion's HPACK encoder for response heads, decoded by the `hpack` library
(another implementation, the one the `h2` client uses), and its field checks
held to zttp's answers."""

from __future__ import annotations

import struct

import hpack
import pytest
import zttp

from zion.http import zttp_shim
from zion.http.hpack import Encoder, valid

DATE = (b"date", b"Mon, 07 Dec 2026 15:00:00 GMT")
HEAD = [(b"content-type", b"text/plain"), (b"content-length", b"12"), (b"server", b"zion"), DATE]


def decode(decoder: hpack.Decoder, block: bytes) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)]


def test_a_repeated_head_becomes_one_byte_a_field_once_seen_twice():
    enc, dec = Encoder(), hpack.Decoder()
    tables = []
    for _ in range(3):
        block = enc.head(200, list(HEAD))
        assert block is not None
        assert decode(dec, block) == [(b":status", b"200"), *HEAD]
        tables.append(len(dec.header_table.dynamic_entries))
    assert tables == [0, 4, 4]  # literals; then each inserted once; then none again
    assert block[0] == 0x88 and len(block) == 1 + len(HEAD)
    assert all(b >= 0x80 + 62 for b in block[1:])  # the dynamic table's indices
    assert enc.head(404, list(HEAD))[0] == 0x8D  # :status from the static table


def test_the_table_evicts_as_the_clients_does_and_indices_stay_right():
    enc, dec = Encoder(), hpack.Decoder()
    for i in range(400):  # ~100 bytes a field: many evictions from a 4096-byte table
        head = [(b"x-n", b"%d" % (i % 97) + b"v" * 60), (b"server", b"zion"), DATE]
        for _ in range(2):
            assert decode(dec, enc.head(200, head)) == [(b":status", b"200"), *head]
    assert enc.size <= 4096 and len(enc.table) == len(enc.entries)


def test_a_smaller_table_from_the_clients_settings_is_said_at_the_next_block():
    """RFC 7541 4.2: the smallest size since the last block, then the final."""
    enc, dec = Encoder(), hpack.Decoder()
    for _ in range(3):
        decode(dec, enc.head(200, list(HEAD)))
    enc.resize(0)
    enc.resize(100)
    block = enc.head(200, list(HEAD))
    assert block[:2] == b"\x20\x3f" and enc.size <= 100  # 0, then 100 (31 + 69)
    dec.max_allowed_table_size = 100
    assert decode(dec, block) == [(b":status", b"200"), *HEAD]
    enc.resize(65536)  # more than we use: our 4096, said once
    block = enc.head(200, list(HEAD))
    assert block.startswith(b"\x3f\xe1\x1f")
    dec.max_allowed_table_size = 65536
    for _ in range(3):
        assert decode(dec, block) == [(b":status", b"200"), *HEAD]
        block = enc.head(200, list(HEAD))
    assert len(block) == 1 + len(HEAD)


def test_secrets_and_large_fields_are_never_indexed():
    enc = Encoder()
    head = [(b"set-cookie", b"id=secret"), (b"x-big", b"v" * 2000)]
    for _ in range(3):
        block = enc.head(200, head)
    assert b"secret" in block and b"v" * 2000 in block and not enc.table


def test_a_field_zttp_refuses_indexes_nothing_and_is_left_to_zttp():
    enc = Encoder()
    enc.head(200, [(b"server", b"zion")])
    before = dict(enc.table), set(enc.seen)
    assert enc.head(200, [(b"server", b"zion"), (b"x", b"a\r\nb")]) is None
    assert enc.head(200, [(b"server", b"zion"), ("x", "str")]) is None  # type: ignore[list-item]
    assert enc.head(200, [(b"x", b"v" * 20000)]) is None  # would need CONTINUATION
    assert (dict(enc.table), set(enc.seen)) == before


def _zttp_sends(name: bytes, value: bytes) -> bool:
    """Does zttp 0.0.35 send a response with this field (or refuse it)?"""
    conn = zttp.Connection(zttp.SERVER, zttp.HTTP2)
    conn.initiate_connection()
    block = b"\x82\x87\x84\x01\x01x"  # GET https / x
    conn.receive_data(zttp_shim.PREFACE + zttp_shim.settings({})
                      + struct.pack("!BHBBI", 0, len(block), 1, 5, 1) + block)
    while type(conn.next_event()) is not zttp.NeedData:
        pass
    try:
        conn.stream(1).send_response(200, [(name, value)], True)
    except zttp.LocalProtocolError:
        return False
    return True


@pytest.mark.parametrize("where", ["name", "value"])
def test_the_fields_refused_are_zttps_byte_for_byte(where):
    for byte in range(256):
        one = bytes((byte,))
        for name, value in ([(b"x" + one + b"y", b"v"), (one, b"v")] if where == "name"
                            else [(b"x", b"a" + one + b"b"), (b"x", one + b"a"),
                                  (b"x", b"a" + one)]):
            assert valid(name, value) == _zttp_sends(name, value), (name, value)


def test_connection_specific_fields_are_refused_as_zttp_does():
    for name, value in [(b"connection", b"close"), (b"keep-alive", b"5"), (b"upgrade", b"h2c"),
                        (b"proxy-connection", b"x"), (b"transfer-encoding", b"chunked"),
                        (b"te", b"trailers"), (b"te", b"gzip"), (b"", b"v"), (b"x", b"")]:
        assert valid(name, value) == _zttp_sends(name, value), (name, value)


def test_what_a_connection_keeps_is_bounded_whatever_the_answers():
    """An app that echoes what clients send (request ids, say) makes every
    head new: the table, the first sightings and the kept blocks stay bounded."""
    enc = Encoder()
    for i in range(2000):
        for _ in range(2):  # each seen twice: indexed, then a block kept
            enc.head(200, [(b"x-id", b"%d" % i), (b"server", b"zion")])
    for i in range(2000):  # each seen once
        enc.head(200, [(b"x-once", b"%d" % i)])
    for status in range(200, 600):  # heads that index nothing new: all kept until the bound
        enc.head(status, [(b"server", b"zion")])
    assert enc.size <= 4096 and len(enc.seen) <= 256 and len(enc.blocks) <= 16
    big = [(b"x-big", b"v" * 1000), (b"x-big2", b"w" * 100)]
    for _ in range(3):
        enc.head(200, big)
    assert (200, *big) not in enc.blocks  # over 1 KiB of fields: never kept
