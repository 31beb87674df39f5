"""Talking to a running zion's admin listener and agent port."""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ZionProcess


def admin_get(proc: ZionProcess, path: str) -> tuple[int, bytes]:
    port = int(proc.wait_event("admin_listening")["port"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def agent_line(proc: ZionProcess) -> str:
    port = int(proc.wait_event("agent_listening")["port"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(256):
            data += chunk
    return data.decode("ascii")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(proc: ZionProcess) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser."""
    status, body = admin_get(proc, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def status(proc: ZionProcess) -> Any:
    import json

    code, body = admin_get(proc, "/status")
    assert code == 200
    return json.loads(body)


_CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_CTX.check_hostname, _CTX.verify_mode = False, ssl.CERT_NONE


def tls_request(port: int, path: str = "/", session: ssl.SSLSession | None = None,
                host: str = "127.0.0.1") -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One request on a new TLS connection (a session given: resume it): the
    answer, the connection's session and whether it resumed `session`."""
    with _CTX.wrap_socket(socket.create_connection((host, port), timeout=10),
                          server_hostname="localhost", session=session) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data, sock.session, sock.session_reused
