"""The PROXY protocol parser (zion/proxy.py): headers as HAProxy, AWS NLB and
curl write them, and every way they can be wrong (tests/test_proxy_fuzz.py
fuzzes its contract)."""

from __future__ import annotations

import pytest

from tests.support.proxy_headers import CLIENT_HELLO, inet, inet6, tlv, v2
from zion.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    Command,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

# -- v1 ------------------------------------------------------------------------


def test_v1_tcp4_then_the_request_is_left_alone():
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    header = parse(line + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader(1, Command.PROXY, ("203.0.113.7", 56324), ("192.0.2.1", 443),
                                 len(line))


def test_v1_tcp6():
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n"
    header = parse(line + CLIENT_HELLO)
    assert header is not None and header.length == len(line)
    assert header.source == ("2001:db8::7", 65535) and header.destination == ("2001:db8::1", 0)


def test_v1_longest_line_is_accepted():
    # Spec 2.1's worst case: two full-length IPv6 addresses, 5-digit ports.
    addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {addr} {addr} 65535 65535\r\n".encode()
    header = parse(line)
    assert header is not None and header.source == (addr, 65535)
    longest = line.replace(b"TCP6", b"UNKNOWN")
    assert len(longest) == V1_MAX_LENGTH
    header = parse(longest)
    assert header is not None and header.length == V1_MAX_LENGTH


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_means_use_the_real_peer(line):
    header = parse(line + b"rest")
    assert header == ProxyHeader(1, Command.PROXY, None, None, len(line))


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF alone
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",  # CR alone
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # one too many
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",  # no such protocol
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",  # case matters
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",  # bad address
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero in an octet
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # IPv6 in TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",  # IPv4 in TCP6
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone index
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",  # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa3\r\n",  # a non-ASCII digit
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # trailing space
    b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # wrong prefix
    b"PROXY\r\n",
])
def test_v1_malformed(line):
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_line_too_long():
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse(b"PROXY UNKNOWN " + b"x" * 93)  # 107 bytes, no CRLF in them
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")  # the LF would be byte 108
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106: a CRLF may still come


def test_v1_truncated_asks_for_more():
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    for end in range(len(line)):
        assert parse(line[:end]) is None, line[:end]


# -- v2 ------------------------------------------------------------------------


def test_v2_tcp4():
    header_bytes = v2(addresses=inet("203.0.113.7", "192.0.2.1", 56324, 443))
    header = parse(header_bytes + CLIENT_HELLO)
    assert header == ProxyHeader(2, Command.PROXY, ("203.0.113.7", 56324),
                                 ("192.0.2.1", 443), len(header_bytes))
    assert header.length == 28


def test_v2_tcp6():
    header_bytes = v2(family=0x21, addresses=inet6("2001:db8::7", "2001:db8::1", 1, 443))
    header = parse(header_bytes + CLIENT_HELLO)
    assert header is not None and header.length == 16 + 36
    assert header.source == ("2001:db8::7", 1) and header.destination == ("2001:db8::1", 443)


def test_v2_local_ignores_its_address_block():
    # HAProxy's health checks with check-send-proxy: LOCAL, often AF_UNSPEC.
    assert parse(v2(command=0x0, family=0x00)) == ProxyHeader(2, Command.LOCAL, None, None, 16)
    local = v2(command=0x0, addresses=inet("10.0.0.1", "10.0.0.2", 1, 2), tlvs=b"\xff")
    assert parse(local) == ProxyHeader(2, Command.LOCAL, None, None, len(local))


def test_v2_unspec_and_unix_mean_use_the_real_peer():
    header = parse(v2(family=0x00))
    assert header is not None and header.source is None
    header = parse(v2(family=0x31, addresses=b"/run/x".ljust(108, b"\0") + b"\0" * 108))
    assert header is not None and header.source is None and header.length == 16 + 216


def test_v2_tlvs_are_kept_and_skipped():
    tlvs = tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xEA, b"\x01vpce-0abc")
    header_bytes = v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443), tlvs=tlvs)
    header = parse(header_bytes + CLIENT_HELLO)
    assert header is not None and header.length == len(header_bytes)
    assert header.tlvs == ((0x02, b"example.com"), (0x04, b""), (0xEA, b"\x01vpce-0abc"))
    assert header.source == ("203.0.113.7", 1)


@pytest.mark.parametrize("tlvs", [b"\x02", b"\x02\x00", b"\x02\x00\x05abcd",
                                  tlv(0x02, b"ok") + b"\x04\xff\xff"])
def test_v2_truncated_tlv(tlvs):
    with pytest.raises(ProxyProtocolError, match="TLV"):
        parse(v2(addresses=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlvs))


@pytest.mark.parametrize(("data", "match"), [
    (v2(version=0x1), "version"),
    (v2(version=0x3), "version"),
    (v2(command=0x2), "command"),
    (v2(command=0xF), "command"),
    (v2(family=0x41), "family"),
    (v2(family=0x13), "family"),
    (v2(family=0x11, addresses=b"\0" * 11), "shorter"),
    (v2(family=0x21, addresses=inet("1.2.3.4", "5.6.7.8", 1, 2)), "shorter"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00", "signature"),
    (v2(length=V2_MAX_LENGTH), "more than"),
    (v2(length=0xFFFF), "more than"),
])
def test_v2_malformed(data, match):
    with pytest.raises(ProxyProtocolError, match=match):
        parse(data)


def test_v2_truncated_asks_for_more():
    header_bytes = v2(addresses=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(1, b"h2"))
    for end in range(len(header_bytes)):
        assert parse(header_bytes[:end]) is None, end


def test_v2_largest_accepted():
    pad = tlv(0x04, b"\0" * (V2_MAX_LENGTH - 16 - 12 - 3))
    header_bytes = v2(addresses=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=pad)
    assert len(header_bytes) == V2_MAX_LENGTH
    header = parse(header_bytes)
    assert header is not None and header.length == V2_MAX_LENGTH


# -- versions and other protocols ---------------------------------------------


def test_wrong_signature_is_rejected_at_once():
    for data in (CLIENT_HELLO, b"GET / HTTP/1.1\r\n", b"\x00", b"\r\n\r\n\r\n"):
        with pytest.raises(ProxyProtocolError):
            parse(data)


def test_only_the_versions_asked_for():
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    binary = v2(addresses=inet("1.2.3.4", "5.6.7.8", 1, 2))
    assert parse(line, v2=False) is not None and parse(binary, v1=False) is not None
    with pytest.raises(ProxyProtocolError, match="v2 header"):
        parse(line, v1=False)
    with pytest.raises(ProxyProtocolError, match="v1 header"):
        parse(binary, v2=False)
    assert parse(b"", v1=False) is None and parse(b"P", v2=False) is None
