"""Built-in endpoints under /_zion/ only, so they never shadow an app's own
routes: /_zion/healthz, /_zion/ready and /_zion/status, for direct loopback
clients only.

"Direct": a same-host reverse proxy or balancer is a loopback peer too, and
its clients are not. A request with forwarding headers, or any connection of
a listener that takes PROXY protocol headers (even a LOCAL one from a
loopback HAProxy), came through one and gets 403. The whole server is seen
from the master's admin listener instead."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zion.http.exchange import Exchange

PREFIX = "/_zion/"
ALLOW_GET = ((b"allow", b"GET, HEAD"),)


def is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    try:
        addr = ipaddress.ip_address(client[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


_FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                         b"forwarded", b"x-real-ip"})


def _came_through_a_proxy(ex: Exchange) -> bool:
    # A same-host reverse proxy is a loopback peer too: its clients are not.
    return any(name in _FORWARDING for name, _ in ex.scope["headers"])


class Builtins:
    def __init__(self, status: Callable[[], dict[str, Any]],
                 overloaded: Callable[[], bool], ready: Callable[[], bool] = lambda: True,
                 *, behind_proxy_protocol: bool = False) -> None:
        self.status = status
        self.overloaded = overloaded
        self.ready = ready
        self.behind_proxy_protocol = behind_proxy_protocol

    def respond(self, ex: Exchange) -> None:
        """Answer a request whose path starts with PREFIX."""
        path = ex.scope["path"]
        if (self.behind_proxy_protocol or not is_loopback(ex.conn.client)
                or _came_through_a_proxy(ex)):
            ex.respond(403, b"403 Forbidden: /_zion/ is for direct loopback clients\n")
        elif ex.scope["method"] not in ("GET", "HEAD"):
            ex.respond(405, b"405 Method Not Allowed\n", extra=ALLOW_GET)
        elif path == "/_zion/healthz":
            if self.overloaded():
                # What new clients of this worker get now: 503 until some close.
                ex.respond(503, b"overloaded: at max_connections\n")
            else:
                ex.respond(200, b"ok\n")
        elif path == "/_zion/ready":
            # Readiness, not liveness: 503 once the server is leaving
            # (--shutdown-delay, a drain), so probes stop sending traffic here.
            if self.ready():
                ex.respond(200, b"ready\n")
            else:
                ex.respond(503, b"stopping\n")
        elif path == "/_zion/status":
            body = json.dumps(self.status(), indent=1).encode() + b"\n"
            ex.respond(200, body, b"application/json")
        else:
            ex.respond(404, b"404 Not Found\n")
