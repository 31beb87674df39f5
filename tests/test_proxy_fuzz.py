"""Fuzz of the PROXY protocol parser's contract (zion/proxy.py): whatever the
bytes, a header, "read more" or its typed error, and never a byte past the
buffer or past the header."""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.proxy_headers import inet, inet6, tlv, v2
from zion.proxy import MAX_LENGTH, ProxyHeader, ProxyProtocolError, parse

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _valid_headers() -> st.SearchStrategy[bytes]:
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).map(str)
    port = st.integers(0, 65535)
    v1_line = st.one_of(
        st.tuples(v4, v4, port, port).map(lambda t: f"PROXY TCP4 {t[0]} {t[1]} {t[2]} {t[3]}\r\n"),
        st.tuples(v6, v6, port, port).map(lambda t: f"PROXY TCP6 {t[0]} {t[1]} {t[2]} {t[3]}\r\n"),
    ).map(str.encode)
    tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
        lambda items: b"".join(tlv(k, v) for k, v in items))
    v2_inet = st.tuples(v4, v4, port, port, tlvs).map(
        lambda t: v2(addresses=inet(*t[:4]), tlvs=t[4]))
    v2_inet6 = st.tuples(v6, v6, port, port, tlvs).map(
        lambda t: v2(family=0x21, addresses=inet6(*t[:4]), tlvs=t[4]))
    v2_local = st.binary(max_size=64).map(lambda b: v2(command=0, family=0, addresses=b))
    return st.one_of(v1_line, v2_inet, v2_inet6, v2_local)


def _outcome(data: bytes) -> ProxyHeader | str | None:
    try:
        return parse(data)
    except ProxyProtocolError:
        return "error"


_FUZZ = settings(max_examples=400, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.one_of(st.binary(max_size=300),
                 _valid_headers().flatmap(lambda h: st.tuples(st.just(h), st.binary(max_size=40))
                                          ).map(lambda t: t[0] + t[1]),
                 _valid_headers().flatmap(lambda h: st.integers(0, len(h)).flatmap(
                     lambda n: st.binary(max_size=20).map(lambda junk: h[:n] + junk)))))
def test_fuzz_never_raises_anything_else_and_never_reads_past_the_buffer(data):
    """Any input: a header, None or ProxyProtocolError, nothing else; a header
    lies within the bytes given and does not depend on what follows it; None
    only while fewer than MAX_LENGTH bytes have been seen; a verdict, once
    reached, never changes as bytes are added."""
    outcome = _outcome(data)
    if isinstance(outcome, ProxyHeader):
        assert 0 < outcome.length <= len(data)
        assert _outcome(data[:outcome.length]) == outcome
        assert _outcome(data + b"\r\n\x00junk") == outcome
        for addr in (outcome.source, outcome.destination):
            if addr is not None:
                ipaddress.ip_address(addr[0])
                assert 0 <= addr[1] <= 65535
    elif outcome is None:
        assert len(data) < MAX_LENGTH
    else:
        assert _outcome(data + b"\r\n" + bytes(range(256))) == "error"
    # Prefixes of a None are None too: bytes are asked for, never guessed.
    if outcome is None:
        for end in range(0, len(data), 7):
            assert _outcome(data[:end]) is None


@_FUZZ
@given(_valid_headers(), st.binary(min_size=1, max_size=60))
def test_fuzz_valid_headers_parse_whatever_follows(header_bytes, rest):
    header = parse(header_bytes + rest)
    assert header is not None and header.length == len(header_bytes)
    for end in range(len(header_bytes)):
        assert parse(header_bytes[:end]) is None
