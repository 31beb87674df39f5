"""Who the client really is behind a trusted proxy: X-Forwarded-For,
X-Forwarded-Proto, X-Forwarded-Host and RFC 7239 Forwarded, believed only
from peers in --forwarded-allow-ips (like uvicorn's ProxyHeadersMiddleware,
but applied while the scope is built, and only for trusted peers, so other
connections pay nothing)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zion.http.asgi_types import HTTPScope, WebSocketScope

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Answers remembered per peer address. Parsing an address with `ipaddress`
# costs about 5 us, paid on every new connection (3 % of a worker's CPU per
# TLS connection in a py-spy profile); a few peers (clients, or the one
# balancer in front) make most connections. Bounded: cleared when full.
_REMEMBERED = 4096


class TrustedProxies:
    def __init__(self, allow: str) -> None:
        entries = [e.strip() for e in allow.split(",") if e.strip()]
        self.everyone = "*" in entries
        self.networks: list[_Network] = [ipaddress.ip_network(e, strict=False)
                                         for e in entries if e != "*"]
        self._answers: dict[str, bool] = {}
        # A peer with no address came over the Unix socket (--uds): a process
        # on this host that the socket file's permissions let in, trusted
        # as loopback is.
        self.local = self.everyone or self._in_networks("127.0.0.1") or self._in_networks("::1")

    def trusts(self, host: str | None) -> bool:
        if host is None:
            return self.local
        if self.everyone:
            return True
        answer = self._answers.get(host)
        if answer is None:
            if len(self._answers) >= _REMEMBERED:
                self._answers.clear()
            answer = self._answers[host] = self._in_networks(host)
        return answer

    def _in_networks(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(addr, "ipv4_mapped", None)
        return any(addr in net or (mapped is not None and mapped in net)
                   for net in self.networks)


# The request fields apply() reads (lowercase names, as both protocols keep them).
FIELDS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


def apply(scope: HTTPScope | WebSocketScope, proxies: TrustedProxies) -> None:
    """Rewrite client, scheme and server from the forwarding headers of a
    request that came from a trusted peer."""
    xff = proto = host = forwarded = None
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b"," + value
        elif name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-host":
            host = value
        elif name == b"forwarded":
            forwarded = value if forwarded is None else forwarded + b"," + value
    if forwarded is not None:
        client, f_proto, f_host = _from_forwarded(forwarded.decode("latin-1"), proxies)
        proto = proto if f_proto is None else f_proto.encode()
        host = host if f_host is None else f_host.encode()
    elif xff is not None:
        client = _rightmost_untrusted([h.strip() for h in xff.decode("latin-1").split(",")],
                                      proxies)
    else:
        client = None
    if client:
        scope["client"] = (client, 0)
    if proto is not None:
        scheme = proto.decode("latin-1").split(",")[0].strip().lower()
        if scheme in ("http", "https", "ws", "wss"):
            if scope["type"] == "websocket":
                scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
            scope["scheme"] = scheme
    if host is not None:
        scope["server"] = _host_port(host.decode("latin-1").split(",")[0].strip(),
                                     443 if scope["scheme"] in ("https", "wss") else 80)


def _host_port(raw: str, default: int) -> tuple[str, int]:
    """ "example.com", "example.com:8443", "[2001:db8::1]:8443" -> (host, port)."""
    if raw.startswith("[") and "]" in raw:
        end = raw.index("]")
        rest = raw[end + 1:]
        return raw[1:end], int(rest[1:]) if rest[1:].isdigit() else default
    name, sep, port = raw.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return raw, default


def _rightmost_untrusted(hops: list[str], proxies: TrustedProxies) -> str | None:
    """The client is the last hop a trusted proxy vouches for: walk from the
    right past trusted proxies; if all are trusted, the leftmost."""
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not proxies.trusts(hop):
            return hop
    return hops[0] if hops else None


def _from_forwarded(value: str, proxies: TrustedProxies
                    ) -> tuple[str | None, str | None, str | None]:
    elements = []
    for element in value.split(","):
        params: dict[str, str] = {}
        for pair in element.split(";"):
            key, _, val = pair.strip().partition("=")
            if key:
                params[key.lower()] = val.strip().strip('"')
        elements.append(params)
    fors = [_node(e.get("for", "")) for e in elements]
    client = _rightmost_untrusted(fors, proxies)
    chosen = elements[fors.index(client)] if client in fors else (elements[0] if elements
                                                                 else {})
    return client, chosen.get("proto"), chosen.get("host")


def _node(value: str) -> str:
    """for= node: "192.0.2.43", "[2001:db8::1]:4711", "192.0.2.43:80", or obfuscated."""
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    host, _, port = value.rpartition(":")
    return host if host and port.isdigit() and host.count(":") == 0 else value
