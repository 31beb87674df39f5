"""File responses (zion/http/files.py): Starlette's FileResponse through
ASGI pathsend over TLS (HTTP/1.1, HTTP/2) and plain HTTP/1.1 (sendfile(2)),
with real clients; bad pathsends; clients that never read."""

from __future__ import annotations

import asyncio
import filecmp
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.admin.support import metrics, total
from tests.conftest import (
    APPS,
    ZionProcess,
    client_context,
    close,
    read_response,
    read_until_closed,
    wait_for,
)

SIZES = {"empty.bin": 0, "one.bin": 1, "1m.bin": 1 << 20, "100m.bin": 100 << 20}
BIG = "100m.bin"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    for name, size in SIZES.items():
        with open(root / name, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
            f.write(os.urandom(size & ((1 << 20) - 1)))
            f.flush()
            os.fsync(f.fileno())  # clean pages: POSIX_FADV_DONTNEED can drop them
    return root


def _env(tmp_path_factory: pytest.TempPathFactory, data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZION_")}
    env["ZION_TLS_STATE_DIR"] = str(tmp_path_factory.mktemp("files-state"))
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(APPS.parent.parent)])
    env["ZION_TEST_DATA"] = str(data)
    env.pop("NOTIFY_SOCKET", None)
    return {**env, **extra}


def _serve(env: dict[str, str], *args: str) -> ZionProcess:
    return ZionProcess(["--port", "0", "--workers", "1", "--no-bpf-demux", "--admin",
                        "127.0.0.1:0", *args, "fw_files:app"], env, APPS).wait_ready()


@pytest.fixture(scope="module")
def tls_srv(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[ZionProcess]:
    srv = _serve(_env(tmp_path_factory, data))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_srv(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[ZionProcess]:
    srv = _serve(_env(tmp_path_factory, data, ZION_LIMITS_SEND_TIMEOUT="2"), "--no-tls",
                 "--access-log")
    yield srv
    srv.stop()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _curl(url: str, out: Path, *args: str) -> str:
    done = subprocess.run(["curl", "-sk", "-o", str(out), "-w", "%{http_code} %{http_version}",
                           *args, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_starlette_file_response_sizes_and_range_over_tls(tls_srv, data, http2):
    async with httpx.AsyncClient(verify=False, http2=http2, timeout=30,
                                 base_url=f"https://127.0.0.1:{tls_srv.port}") as c:
        seen = (await c.get("/extensions")).json()
        assert "http.response.pathsend" in seen
        for name in ("empty.bin", "one.bin", "1m.bin"):
            resp = await c.get(f"/file/{name}")
            assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert resp.status_code == 200 and resp.content == (data / name).read_bytes()
            assert resp.headers["content-length"] == str(SIZES[name])
        head = await c.head("/file/1m.bin")
        assert head.status_code == 200 and head.headers["content-length"] == str(1 << 20)
        # Starlette answers a Range itself, with body messages.
        part = await c.get("/file/1m.bin", headers={"range": "bytes=1000-1999"})
        assert part.status_code == 206
        assert part.content == (data / "1m.bin").read_bytes()[1000:2000]


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_100mib_with_curl_over_tls(tls_srv, data, tmp_path, version):
    # Out of the page cache (this file's pages only): the chunks the disk must
    # give are read in a thread, the cached ones on the loop (files._cached).
    fd = os.open(data / BIG, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    out = tmp_path / "got"
    code = _curl(f"https://127.0.0.1:{tls_srv.port}/file/{BIG}", out, version)
    assert code == ("200 1.1" if version == "--http1.1" else "200 2")
    assert filecmp.cmp(out, data / BIG, shallow=False)


def test_plain_http_sends_the_file_with_sendfile(plain_srv, data, tmp_path):
    before = total(metrics(plain_srv), "zion_sendfile_bytes_total")
    out = tmp_path / "got"
    for name in ("one.bin", BIG):
        assert _curl(f"http://127.0.0.1:{plain_srv.port}/file/{name}", out) == "200 1.1"
        assert filecmp.cmp(out, data / name, shallow=False)
    # Counted from what sendfile(2) returned: the bytes never passed through Python.
    assert total(metrics(plain_srv), "zion_sendfile_bytes_total") - before == SIZES[BIG] + 1
    logged = wait_for(lambda: [e for e in plain_srv.events("access")
                               if e.get("path") == f"/file/{BIG}"], 10, "the access log line")
    assert logged[-1]["bytes"] == SIZES[BIG]


async def test_plain_http_pipelined_files_keep_their_framing(plain_srv, data):
    """sendfile writes the socket directly: the next answer must wait for it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_srv.port)
    writer.write(b"".join(f"GET /file/{name} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
                          for name in ("1m.bin", "empty.bin", "one.bin")))
    for name in ("1m.bin", "empty.bin", "one.bin"):
        resp = await asyncio.wait_for(read_response(reader), 20)
        assert resp.status == 200 and resp.body == (data / name).read_bytes()
    await close(writer)


@pytest.mark.parametrize("case", ["relative", "missing", "directory", "wrong-length"])
async def test_a_bad_pathsend_is_a_500_and_the_worker_stays(tls_srv, case):
    worker = tls_srv.worker_pids()
    async with httpx.AsyncClient(verify=False, timeout=10,
                                 base_url=f"https://127.0.0.1:{tls_srv.port}") as c:
        bad = await c.get(f"/raw/{case}")
        assert bad.status_code == 500
        good = await c.get("/raw/one")
        assert good.status_code == 200 and len(good.content) == 1
    assert tls_srv.worker_pids() == worker
    wait_for(lambda: any("PathsendError" in e.get("error", "") and e.get("path") == f"/raw/{case}"
                         for e in tls_srv.events("app_error")), 10, "the app_error log line")


SHORT = Path("/sys/devices/system/cpu/online")


@pytest.mark.skipif(not SHORT.is_file() or SHORT.stat().st_size <= len(SHORT.read_bytes()),
                    reason=f"needs {SHORT}: a file shorter than its st_size (sysfs)")
@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_file_shorter_than_announced_ends_the_connection(tls_srv, plain_srv, scheme):
    srv = tls_srv if scheme == "https" else plain_srv
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", srv.port, ssl=client_context() if scheme == "https" else None,
        server_hostname="localhost" if scheme == "https" else None)
    writer.write(b"GET /raw/short HTTP/1.1\r\nhost: x\r\n\r\n")
    got = await read_until_closed(reader, timeout=20)
    await close(writer)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length: 4096" in head.lower() and len(body) < 4096


async def test_clients_that_never_read_hold_bounded_memory(start_zion, data):
    """100 MiB downloads whose clients read only the head, on TLS HTTP/1.1,
    HTTP/2 and plain HTTP/1.1: the worker holds write buffers, not files
    (unbounded, that is 100 MiB each)."""
    env = {"ZION_TEST_DATA": str(data)}
    tls = start_zion("--no-bpf-demux", "fw_files:app", env=env, workers=1)
    plain = start_zion("--no-bpf-demux", "--no-tls", "fw_files:app", env=env, workers=1)
    before = {srv.port: _rss_mib(srv.worker_pids()[0]) for srv in (tls, plain)}
    clients = []
    try:
        for srv, scheme, http2 in ((tls, "https", False), (tls, "https", True),
                                   (plain, "http", False)):
            c = httpx.AsyncClient(verify=False, http2=http2, timeout=30)
            clients.append(c)
            url = f"{scheme}://127.0.0.1:{srv.port}/file/{BIG}"
            resp = await c.send(c.build_request("GET", url), stream=True)
            assert resp.status_code == 200
        for srv, scheme in ((tls, "https"), (plain, "http")):
            # The worker answers another request: whatever a response would
            # buffer in one go, it has by now.
            async with httpx.AsyncClient(verify=False, timeout=10) as probe:
                assert (await probe.get(f"{scheme}://127.0.0.1:{srv.port}/_zion/healthz")
                        ).status_code == 200
            grown = _rss_mib(srv.worker_pids()[0]) - before[srv.port]
            assert grown < 40, f"{scheme}: the worker grew {grown:.0f} MiB"
    finally:
        for c in clients:
            await c.aclose()


async def test_plain_http_client_that_never_reads_is_cut_at_send_timeout(plain_srv):
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_srv.port)
    writer.write(f"GET /file/{BIG} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")

    def open_connections() -> bool:
        status = httpx.get(f"http://127.0.0.1:{plain_srv.port}/_zion/status", timeout=5)
        return status.json()["connections"] == 1  # this status request only

    # send_timeout is 2 s: the server gives up on it, then counts it no more.
    wait_for(open_connections, 20, "the unread connection to be closed", interval=0.2)
    writer.transport.abort()
