"""Static files: types, validators, ranges, and no escape from the root."""

from __future__ import annotations

import os

import pytest

from tests.conftest import close, connect, get, read_until_closed, wait_for
from zion.handlers.static import parse_range


@pytest.fixture
def site(tmp_path, start_zion):
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "style.css").write_text("body{}")
    (root / "data.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "index.html").write_text("sub index")
    (tmp_path / "secret.txt").write_text("do not serve")
    os.symlink(tmp_path / "secret.txt", root / "link-out")
    srv = start_zion("--root", str(root))
    srv.root = root
    return srv


async def test_content_types_and_index(site):
    resp = await get(site.port, "/")
    assert resp.status == 200 and resp.body == b"<h1>home</h1>"
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert (await get(site.port, "/style.css")).headers["content-type"].startswith("text/css")
    assert (await get(site.port, "/data.bin")).headers["content-type"] == \
        "application/octet-stream"
    assert (await get(site.port, "/sub/")).body == b"sub index"
    assert (await get(site.port, "/nope.txt")).status == 404
    assert (await get(site.port, "/", method="POST")).status == 405


async def test_etag_and_last_modified_give_304(site):
    first = await get(site.port, "/style.css")
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    assert (await get(site.port, "/style.css", {"if-none-match": etag})).status == 304
    assert (await get(site.port, "/style.css", {"if-modified-since": modified})).status == 304
    assert (await get(site.port, "/style.css", {"if-none-match": '"other"'})).status == 200


async def test_ranges(site):
    data = (site.root / "data.bin").read_bytes()
    resp = await get(site.port, "/data.bin", {"range": "bytes=10-19"})
    assert resp.status == 206 and resp.body == data[10:20]
    assert resp.headers["content-range"] == f"bytes 10-19/{len(data)}"
    resp = await get(site.port, "/data.bin", {"range": "bytes=-5"})
    assert resp.body == data[-5:]
    resp = await get(site.port, "/data.bin", {"range": f"bytes={len(data)}-"})
    assert resp.status == 416
    head = await get(site.port, "/data.bin", {"range": "bytes=0-9"}, method="HEAD")
    assert head.status == 206 and head.headers["content-length"] == "10"


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/..%2fsecret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt",
    "/link-out", "//etc/passwd", "/%00",
])
async def test_no_path_traversal(site, path):
    reader, writer = await connect(site.port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    data = await read_until_closed(reader)
    await close(writer)
    assert b"do not serve" not in data and b"root:" not in data
    assert data.split(b" ", 2)[1] in (b"404", b"400")


def test_parse_range():
    assert parse_range(b"bytes=0-0", 10) == (0, 0)
    assert parse_range(b"bytes=5-", 10) == (5, 9)
    assert parse_range(b"bytes=-3", 10) == (7, 9)
    assert parse_range(b"bytes=0-99", 10) == (0, 9)
    assert parse_range(b"bytes=10-", 10) is False
    assert parse_range(b"bytes=0-1,3-4", 10) is None
    assert parse_range(b"items=0-1", 10) is None


def test_plain_http_sends_static_files_with_sendfile(start_zion, tmp_path):
    """--no-tls: the body goes by sendfile(2) (http/files.py), ranges too;
    /metrics counts what sendfile returned."""
    import subprocess

    from tests.admin.support import metrics, total

    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "data.bin").write_bytes(data)
    srv = start_zion("--root", str(tmp_path), "--no-tls", "--no-bpf-demux",
                     "--admin", "127.0.0.1:0", workers=1)
    url = f"http://127.0.0.1:{srv.port}/data.bin"
    whole = subprocess.run(["curl", "-s", url], capture_output=True, timeout=30).stdout
    part = subprocess.run(["curl", "-s", "-r", "10-19", url], capture_output=True,
                          timeout=30).stdout
    assert whole == data and part == data[10:20]
    # The worker counts right after sendfile(2) returns; curl may have its
    # bytes and exit before the worker runs again (seen under load).
    sent = len(data) + 10
    wait_for(lambda: total(metrics(srv), "zion_sendfile_bytes_total") >= sent, 10,
             "the worker to count what it sent")
    assert total(metrics(srv), "zion_sendfile_bytes_total") == sent
