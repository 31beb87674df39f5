"""One server per address: a second `zion serve` on a served port is refused
and the first keeps every connection."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess

import pytest

from tests.conftest import get, wait_for
from zion.listeners import bind_group


async def test_a_second_server_on_the_same_port_is_refused(start_zion):
    first = start_zion("raw_app:app", workers=2)
    second = start_zion("raw_app:app", "--port", str(first.port), workers=2, ready=False)
    assert second.proc.wait(20) == 1
    fatal = second.events("fatal")
    assert len(fatal) == 1
    assert f"127.0.0.1:{first.port}: it is already served by" in fatal[0]["error"]
    served_by = {int((await get(first.port, "/")).headers["x-pid"]) for _ in range(20)}
    assert served_by <= set(first.worker_pids())


def test_a_listener_shut_and_listened_again_keeps_the_port_even_when_port_0_chose_it():
    # The master moves a blocked worker's queue by shutdown(2) and listen(2)
    # on its listener; a socket whose port the kernel picked (bound to port
    # 0) gives the port back on shutdown and would listen on another one.
    group = bind_group("127.0.0.1", 0, 3, 16)
    try:
        for sock in group.sockets:
            sock.shutdown(socket.SHUT_RDWR)
            sock.listen(16)
            assert sock.getsockname()[1] == group.port
    finally:
        group.close()


def _curl_unix(path: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sk", "--max-time", "10", "--unix-socket", path, *extra,
                           url], capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_uds_is_one_socket_every_worker_serves(start_zion, tmp_path, tls):
    """--uds PATH: one Unix socket for all workers (a proxy on the same host),
    beside the TCP listeners; a client there is trusted like loopback for
    X-Forwarded-For; the file is gone after a clean stop."""
    path = str(tmp_path / "zion.sock")
    srv = start_zion("whoami_app:app", "--uds", path, "--no-bpf-demux", "--access-log",
                     *([] if tls else ["--no-tls"]), workers=2)
    assert srv.wait_event("listening_uds")["path"] == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    url = f"{'https' if tls else 'http'}://localhost/"

    def both_seen() -> bool:
        # Connections in parallel: the workers share one accept queue.
        procs = [subprocess.Popen(["curl", "-sk", "--max-time", "10", "--unix-socket", path,
                                   "-o", "/dev/null", url]) for _ in range(8)]
        for proc in procs:
            proc.wait(20)
        return {line["worker"] for line in srv.events("access")} == {0, 1}

    assert wait_for(both_seen, 30, "both workers answering on the socket")
    out = _curl_unix(path, url, "-H", "x-forwarded-for: 203.0.113.9")
    facts = json.loads(out.stdout)
    assert facts["client"] == ["203.0.113.9", 0] and facts["server"] == []
    assert facts["scheme"] == ("https" if tls else "http")
    assert srv.stop() == 0
    assert not os.path.exists(path)


def test_uds_path_in_use_or_not_a_socket(start_zion, tmp_path):
    path = tmp_path / "zion.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a file left behind, nobody listening: replaced
    first = start_zion("--uds", str(path), "--no-tls", "--no-bpf-demux", workers=1)
    second = start_zion("--uds", str(path), "--no-tls", "--no-bpf-demux", workers=1,
                        ready=False)
    assert second.proc.wait(30) == 1
    assert "another server is listening on it" in second.log_text()
    first.stop()
    regular = tmp_path / "file"
    regular.write_text("")
    third = start_zion("--uds", str(regular), "--no-tls", workers=1, ready=False)
    assert third.proc.wait(30) == 1 and "is not a socket" in third.log_text()
