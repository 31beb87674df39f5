"""What the admin listener answers: /metrics, /status, /ready."""

from __future__ import annotations

import json

from zion.admin import metrics
from zion.admin.listener import Reply
from zion.admin.view import HostView, status_document

PATHS = ("/metrics", "/status", "/ready")


def answer(method: str, path: str, view: HostView) -> Reply:
    if path not in PATHS:
        return Reply(404, b"not found: try /metrics, /status or /ready\n")
    if method not in ("GET", "HEAD"):
        return Reply(405, b"GET or HEAD only\n")
    if path == "/metrics":
        return Reply(200, metrics.render(view), metrics.CONTENT_TYPE)
    if path == "/status":
        return Reply(200, json.dumps(status_document(view), indent=1).encode() + b"\n",
                     "application/json")
    ready, why = view.ready
    # Kubernetes readiness: any 2xx/3xx is ready, anything else is not.
    return Reply(200 if ready else 503, f"{why}\n".encode())
