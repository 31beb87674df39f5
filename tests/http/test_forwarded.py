"""Forwarded headers, believed only from trusted peers; root_path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.fake_transport import connect, make_state, settle
from zion.http.forwarded import TrustedProxies, apply


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "scheme": "https", "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8443), "headers": headers}


@pytest.mark.parametrize(("headers", "client", "scheme", "server"), [
    ([(b"x-forwarded-for", b"203.0.113.7")], "203.0.113.7", "https", ("127.0.0.1", 8443)),
    # a chain: the client is the rightmost hop the trusted proxies do not cover
    ([(b"x-forwarded-for", b"198.51.100.1, 203.0.113.7, 10.0.0.2")], "203.0.113.7", "https",
     ("127.0.0.1", 8443)),
    ([(b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-proto", b"http"),
      (b"x-forwarded-host", b"example.com")], "203.0.113.7", "http", ("example.com", 80)),
    ([(b"forwarded", b'for="[2001:db8::1]:4711";proto=https;host=example.com:8443')],
     "2001:db8::1", "https", ("example.com", 8443)),
    ([(b"forwarded", b"for=192.0.2.60;proto=http, for=10.0.0.2")], "192.0.2.60", "http",
     ("127.0.0.1", 8443)),
])
def test_forwarding_headers_from_a_trusted_peer(headers, client, scheme, server):
    scope = _scope(headers)
    apply(scope, TrustedProxies("127.0.0.1, 10.0.0.0/8"))
    assert (scope["client"][0], scope["scheme"], scope["server"]) == (client, scheme, server)


def test_trust_lists():
    proxies = TrustedProxies("127.0.0.1,::1,10.0.0.0/8")
    assert proxies.trusts("10.1.2.3") and proxies.trusts("::1")
    assert proxies.trusts("::ffff:127.0.0.1") and not proxies.trusts("203.0.113.7")
    assert TrustedProxies("*").trusts("203.0.113.7") and not TrustedProxies("").trusts("::1")


async def _answer(state: Any, request: bytes, peer: str) -> dict[str, Any]:
    async def app(scope, receive, send):
        body = json.dumps({"client": scope["client"][0], "scheme": scope["scheme"],
                           "root_path": scope["root_path"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    from tests.support.fake_transport import FakeTransport
    from zion.http.h1 import H1Protocol

    state.dispatch = lambda ex: ex.run(app, state.tasks)
    proto = H1Protocol(state)
    tr = FakeTransport(proto)
    tr.extra["peername"] = (peer, 40000)
    proto.connection_made(tr)  # type: ignore[arg-type]
    tr.feed(request)
    await settle()
    return json.loads(tr.take().split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


async def test_only_trusted_peers_are_believed_and_root_path_is_set():
    request = (b"GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 203.0.113.7\r\n"
               b"x-forwarded-proto: http\r\n\r\n")
    state = make_state(server={"root_path": "/api"})
    trusted = await _answer(state, request, "127.0.0.1")
    assert trusted == {"client": "203.0.113.7", "scheme": "http", "root_path": "/api"}
    untrusted = await _answer(state, request, "198.51.100.9")
    assert untrusted["client"] == "198.51.100.9" and untrusted["scheme"] == "https"
    off = await _answer(make_state(server={"proxy_headers": False}), request, "127.0.0.1")
    assert off["client"] == "127.0.0.1"


async def test_status_is_refused_to_a_request_that_came_through_a_proxy():
    from zion.handlers.builtins import Builtins

    state = make_state()
    builtins = Builtins(lambda: {"worker": 0}, lambda: False)
    state.dispatch = builtins.respond
    tr = connect(state)
    tr.feed(b"GET /_zion/status HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 203.0.113.7\r\n\r\n")
    await settle()
    assert tr.take().startswith(b"HTTP/1.1 403")


def test_forwarded_host_with_ipv6_and_default_ports():
    scope = _scope([(b"x-forwarded-host", b"[2001:db8::5]:9443")])
    apply(scope, TrustedProxies("127.0.0.1"))
    assert scope["server"] == ("2001:db8::5", 9443)
    scope = _scope([(b"x-forwarded-host", b"example.org")])
    apply(scope, TrustedProxies("127.0.0.1"))
    assert scope["server"] == ("example.org", 443)


def test_a_peers_answer_is_parsed_once_and_the_memory_is_bounded(monkeypatch):
    import zion.http.forwarded as forwarded

    proxies = TrustedProxies("10.0.0.0/8")
    parsed: list[str] = []
    real = forwarded.ipaddress.ip_address
    monkeypatch.setattr(forwarded.ipaddress, "ip_address",
                        lambda host: parsed.append(host) or real(host))
    assert all(proxies.trusts("10.1.2.3") for _ in range(100))
    assert not any(proxies.trusts("203.0.113.7") for _ in range(100))
    assert parsed == ["10.1.2.3", "203.0.113.7"]  # once per peer, not per connection
    for i in range(forwarded._REMEMBERED + 10):
        proxies.trusts(f"10.0.{i // 256}.{i % 256}")
    assert len(proxies._answers) <= forwarded._REMEMBERED
