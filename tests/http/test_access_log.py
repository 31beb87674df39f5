"""zion/http/access_log.py: the access line from a real server and real
clients (HTTP/1.1 and HTTP/2), the structured fields and custom formats."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.conftest import APPS, REPO, close, connect, get, read_response, wait_for
from zion.http.access_log import AccessRecord, check_format, format_line


def _access(srv: Any, count: int = 1) -> list[dict[str, Any]]:
    return wait_for(lambda: len(lines := srv.events("access")) >= count and lines,  # type: ignore[no-any-return]
                    what=f"{count} access lines")


async def test_fields_on_http11_and_http2(start_zion):
    srv = start_zion("raw_app:app", "--access-log", workers=1)
    reader, writer = await connect(srv.port)
    local_port = writer.get_extra_info("sockname")[1]
    writer.write(b"POST /echo?a=1&b=two HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                 b"connection: close\r\n\r\nhello")
    resp = await read_response(reader)
    await close(writer)
    line = _access(srv)[0]
    assert (line["method"], line["path"], line["status"], line["http"]) == (
        "POST", "/echo?a=1&b=two", 200, "1.1")
    assert (line["client"], line["port"]) == ("127.0.0.1", local_port)
    assert line["bytes"] == len(resp.body) == len(b"got 5 bytes")
    assert isinstance(line["duration_us"], int) and 0 < line["duration_us"] < 10_000_000
    async with httpx.AsyncClient(http2=True, verify=False) as client:
        r = await client.get(f"https://127.0.0.1:{srv.port}/big?1000")
        assert r.http_version == "HTTP/2" and len(r.content) == 1000
    line = _access(srv, 2)[1]
    assert (line["path"], line["http"], line["bytes"]) == ("/big?1000", "2", 1000)
    assert line["port"] > 0 and line["duration_us"] > 0
    # Microseconds, not libuv's cached milliseconds (uvloop's loop.time()):
    # three durations all whole milliseconds would be a 1-in-10^7 accident.
    async with httpx.AsyncClient(http2=True, verify=False) as client:
        for _ in range(3):
            await client.get(f"https://127.0.0.1:{srv.port}/big?10")
    for _ in range(3):
        await get(srv.port, "/big?10")
    lines = _access(srv, 8)
    for version in ("1.1", "2"):
        durations = [ln["duration_us"] for ln in lines if ln["http"] == version]
        assert any(abs(d - round(d, -3)) > 1 for d in durations), (version, durations)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("fmt, expect", [
    ('%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s',
     r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /big\?7 HTTP/1\.1" '
     r'200 7 "https://ref\.example/" "curl/[^"]+" \d+'),
    ('%(client_addr)s - "%(request_line)s" %(status_code)s',
     r'127\.0\.0\.1:\d+ - "GET /big\?7 HTTP/1\.1" 200'),
    ("%(m)s %(U)s %(q)s %(H)s %(B)s %({x-trace}i)s %(L)s",
     r"GET /big 7 HTTP/1\.1 7 abc \d+\.\d{6}"),
])
def test_custom_formats_gunicorn_and_uvicorn_atoms(start_zion, fmt, expect):
    srv = start_zion("raw_app:app", "--access-log", "--access-log-format", fmt, workers=1)
    subprocess.run(["curl", "-sk", "--http1.1", "-e", "https://ref.example/", "-H",
                    "x-trace: abc", f"https://127.0.0.1:{srv.port}/big?7"],
                   capture_output=True, timeout=20, check=True)
    line = _access(srv)[0]
    assert re.fullmatch(expect, line["line"]), line


def test_an_unknown_atom_is_a_one_line_config_error():
    result = subprocess.run(
        [sys.executable, "-m", "zion", "serve", "--access-log-format", "%(h)s %(zz)s"],
        capture_output=True, text=True, timeout=30, cwd=APPS,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()] and "unknown atom %(zz)s" in result.stderr, result.stderr


def test_atoms_without_a_server():
    record = AccessRecord("GET", "/a", b"x=1", 204, 0, None, "2", 0.0000123)
    assert check_format("%(r)s %(b)s %(h)s %(D)s") is None
    assert format_line("%(r)s %(b)s %(h)s %(D)s %(M)s", record) == "GET /a?x=1 HTTP/2 - - 12 0"
    assert "unknown atom %({x}o)s" in str(check_format("%({x}o)s"))
