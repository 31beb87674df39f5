"""zion/http/accept_errors.py: a worker out of file descriptors says so in
the log, at most once a second, on both accept paths (uvloop's server and
the PROXY listener's own accept), and serves again once descriptors are back.
The workers' RLIMIT_NOFILE is lowered with prlimit(2), as `prlimit --pid`."""

from __future__ import annotations

import datetime
import itertools
import os
import resource
import socket
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import client_context, wait_for
from zion.http.accept_errors import AcceptErrors


def _squeeze(pid: int, spare: int = 2) -> tuple[int, int]:
    """Leave worker `pid` `spare` descriptors to open (the soft limit only:
    raising a hard limit back needs CAP_SYS_RESOURCE); return the old limits."""
    used = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + spare, hard))
    return soft, hard


def _ts(line: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def _flood(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def _served(port: int) -> bool:
    try:
        with client_context().wrap_socket(socket.create_connection(("127.0.0.1", port),
                                                                   timeout=5),
                                          server_hostname="localhost") as tls:
            tls.sendall(b"GET /_zion/healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return tls.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _at_most_one_a_second(lines: list[dict[str, Any]]) -> None:
    times = sorted(_ts(ln) for ln in lines)
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times)), times


@pytest.mark.parametrize("proxy", [False, True], ids=["uvloop", "proxy-protocol"])
def test_out_of_descriptors_is_logged_once_a_second_then_recovers(start_zion, proxy):
    extra = ["--proxy-protocol", "v2"] if proxy else []
    srv = start_zion(*extra, "--no-bpf-demux", workers=1)
    worker = srv.worker_pids()[0]
    assert _served(srv.port) or proxy
    limits = _squeeze(worker)
    held = _flood(srv.port, 40)
    event = "accept_failed" if proxy else "accept_failing"
    lines = wait_for(lambda: len(found := srv.events(event)) >= 3 and found, 20,
                     f"three {event} lines")
    first = lines[0]
    assert first["error"].startswith("EMFILE") and "open-files limit" in first["hint"]
    assert first["worker"] == 0
    if proxy:
        # Counted exactly: many failed accepts (the listener retries every
        # 0.1 s), a handful of lines.
        assert lines[-1]["total"] > len(lines), lines
    _at_most_one_a_second(lines)
    for sock in held:
        sock.close()
    resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
    if not proxy:
        srv.wait_event("accept_recovered")
        assert wait_for(lambda: _served(srv.port), 10, "a request served again")


def test_a_burst_is_one_line_then_one_a_second_with_the_count():
    now = [100.0]
    errors = AcceptErrors(clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(50):
            errors.failed(24)  # EMFILE
        now[0] += 0.5
        for _ in range(50):
            errors.failed(24)
        now[0] += 0.6
        errors.failed(24)
    assert [(ln["event"], ln["count"]) for ln in logs] == [("accept_failed", 1),
                                                          ("accept_failed", 100)]
