"""The page `zion serve` shows with no app and no --root."""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING

from zion.handlers.builtins import ALLOW_GET

if TYPE_CHECKING:
    from zion.http.exchange import Exchange


def respond(ex: Exchange, worker_index: int) -> None:
    if ex.scope["method"] not in ("GET", "HEAD"):
        ex.respond(405, b"405 Method Not Allowed\n", extra=ALLOW_GET)
        return
    body = _PAGE.format(worker=worker_index, pid=os.getpid(),
                        path=html.escape(ex.scope["path"])).encode()
    ex.respond(200, body, b"text/html; charset=utf-8",
               extra=((b"x-zion-worker", b"%d" % worker_index),))


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
