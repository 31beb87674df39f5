"""Built-in endpoints: /healthz, /_zion/status (loopback only), the default page."""

from __future__ import annotations

import html
import ipaddress
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zion.http.cycle import RequestCycle
    from zion.http.protocol import HttpProtocol

_ALLOW = b"allow: GET, HEAD\r\n"


def _is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    try:
        addr = ipaddress.ip_address(client[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def respond(proto: HttpProtocol, cycle: RequestCycle) -> None:
    path = cycle.scope["path"]
    if cycle.scope["method"] not in ("GET", "HEAD"):
        proto.respond(cycle, 405, b"405 Method Not Allowed\n", extra=_ALLOW)
    elif path == "/healthz":
        proto.respond(cycle, 200, b"ok\n")
    elif path == "/_zion/status":
        if not _is_loopback(proto.client):
            proto.respond(cycle, 403, b"403 Forbidden: /_zion/status is for loopback clients\n")
            return
        body = json.dumps(proto.state.status(), indent=1).encode() + b"\n"
        proto.respond(cycle, 200, body, b"application/json")
    else:
        proto.respond(cycle, 404, b"404 Not Found\n")


def default_page(proto: HttpProtocol, cycle: RequestCycle) -> None:
    if cycle.scope["method"] not in ("GET", "HEAD"):
        proto.respond(cycle, 405, b"405 Method Not Allowed\n", extra=_ALLOW)
        return
    state = proto.state
    body = _PAGE.format(worker=state.worker_index, pid=os.getpid(),
                        path=html.escape(cycle.scope["path"])).encode()
    proto.respond(cycle, 200, body, b"text/html; charset=utf-8",
                  extra=b"x-zion-worker: %d\r\n" % state.worker_index)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>zion</title></head>
<body>
<h1>zion is running</h1>
<p>Worker {worker} (pid {pid}) answered this request for <code>{path}</code>.</p>
<p>Serve an ASGI app with <code>zion serve module:app</code> or files with
<code>zion serve --root DIR</code>.
Worker and demux state: <a href="/_zion/status">/_zion/status</a>.</p>
</body></html>
"""
