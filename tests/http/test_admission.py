"""Per-request limits on both protocols, against a real `zion serve` with real
clients: the request timeout (--timeout-request) and load shedding
(--limit-concurrency)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin.support import admin_get, agent_line
from tests.admin.support import status as admin_status
from tests.conftest import ZionProcess, close, connect, get, read_until_closed, wait_for
from tests.support.h2peer import open_tls, pump
from tests.support.serve import serve
from zion.http.admission import Expiry, at_limit, expiry, shed, streaming
from zion.settings import LimitsSettings


def _client(srv: ZionProcess, http2: bool) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=False, http2=http2, http1=not http2, timeout=20,
                             base_url=f"https://127.0.0.1:{srv.port}")


# -- the decisions --------------------------------------------------------------

def test_shed_past_either_limit_and_only_then():
    limits = LimitsSettings(concurrency=2, retry_after=3)
    assert shed(limits, connections=2, inflight=1) is None
    by_conns = shed(limits, connections=3, inflight=0)
    assert by_conns is not None and by_conns.close and by_conns.retry_after == 3
    by_requests = shed(limits, connections=1, inflight=2)
    assert by_requests is not None and not by_requests.close
    assert shed(LimitsSettings(concurrency=0), 10**6, 10**6) is None
    assert at_limit(2, connections=2, inflight=0) and not at_limit(2, 1, 1)


def test_expiry_and_streaming():
    assert expiry(head_written=False) is Expiry.RESPOND_504
    assert expiry(head_written=True) is Expiry.ABORT
    assert streaming({"type": "http.response.body", "body": b"x", "more_body": True})
    assert not streaming({"type": "http.response.body", "body": b"x"})


# -- --timeout-request ----------------------------------------------------------

@pytest.fixture
def timed(start_zion: Any, tmp_path: Path) -> tuple[ZionProcess, Path]:
    events = tmp_path / "events"
    srv = serve(start_zion, "supervise_app:app", "--timeout-request", "1", workers=1,
                env={"ZION_TEST_EVENTS": str(events)})
    return srv, events


def _logged(srv: ZionProcess, event: str, count: int) -> list[dict[str, Any]]:
    wait_for(lambda: len(srv.events(event)) >= count, 20, f"{count} {event} lines")
    return srv.events(event)


def _noted(events: Path, line: str) -> bool:
    return events.exists() and line in events.read_text().splitlines()


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_an_app_past_the_request_timeout_is_cancelled_and_answered_504(timed, http2):
    srv, events = timed
    version = "2" if http2 else "1.1"
    async with _client(srv, http2) as client:
        started = time.monotonic()
        resp = await client.get("/forever")
        assert resp.status_code == 504 and resp.http_version == f"HTTP/{version}"
        assert 0.9 <= time.monotonic() - started < 5
        # The app saw the cancellation where it awaited.
        await asyncio.to_thread(wait_for, lambda: _noted(events, f"cancelled {version}"), 5,
                                "the app's CancelledError")
        # A head the app sent but zion had not written yet is replaced by the 504.
        resp = await client.get("/head-then-wait")
        assert resp.status_code == 504
        # The worker keeps serving, on this same client (HTTP/2: same connection).
        resp = await client.get("/")
        assert resp.status_code == 200 and resp.text == "ok"
    # The log is read by a thread of the test: it can lag behind the answers.
    timeouts = await asyncio.to_thread(_logged, srv, "request_timeout", 2)
    assert [(e["path"], e["answer"], e["http_version"]) for e in timeouts] == [
        ("/forever", "504", version), ("/head-then-wait", "504", version)]
    assert not srv.events("worker_died") and not srv.events("app_error")


async def test_a_response_whose_head_is_out_has_its_stream_reset_at_the_timeout(timed):
    srv, _ = timed
    async with _client(srv, http2=True) as client:
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError, match="StreamReset"):
            await client.get("/trailers-then-wait")
        assert time.monotonic() - started < 5
        # Only that stream: the connection goes on.
        resp = await client.get("/")
        assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    [timeout] = await asyncio.to_thread(_logged, srv, "request_timeout", 1)
    assert timeout["answer"] == "closed" and timeout["path"] == "/trailers-then-wait"


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_a_streaming_response_is_not_cut_by_the_request_timeout(timed, http2):
    srv, _ = timed
    async with _client(srv, http2) as client:
        resp = await client.get("/stream?n=4&every=0.5")  # 2 s against a 1 s timeout
    assert resp.status_code == 200 and resp.text == "tick\n" * 4 + "done\n"
    assert not srv.events("request_timeout")


async def test_without_a_request_timeout_a_slow_app_is_left_alone(start_zion):
    srv = serve(start_zion, "supervise_app:app", workers=1)
    resp = await get(srv.port, "/slow?s=1.5")
    assert resp.status == 200


# -- --limit-concurrency ---------------------------------------------------------

def _admin_inflight(srv: ZionProcess) -> int:
    """Requests in flight, from the admin listener: asking /_zion/status
    would open a connection to the worker, which --limit-concurrency counts."""
    return sum(w["inflight"] for w in admin_status(srv)["workers"])


async def test_past_the_concurrency_limit_requests_get_503_with_retry_after_at_once(
        start_zion, tmp_path):
    release = tmp_path / "release"
    srv = serve(start_zion, "supervise_app:app", "--limit-concurrency", "2",
                "--retry-after", "7", "--admin", "127.0.0.1:0", "--agent", "127.0.0.1:0",
                workers=1, env={"ZION_TEST_RELEASE": str(release)})
    assert (await get(srv.port, "/_zion/ready")).status == 200
    assert admin_get(srv, "/ready")[0] == 200
    # Two held requests on two connections: the worker is at its limit.
    held = [asyncio.create_task(get(srv.port, "/hold")) for _ in range(2)]
    await asyncio.to_thread(wait_for, lambda: _admin_inflight(srv) == 2, 30, "two in flight")
    # A third connection is answered at once, 503 + Retry-After, and closed:
    # while the two are still held, so it did not wait for room.
    reader, writer = await connect(srv.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
    raw = await read_until_closed(reader, 20)
    await close(writer)
    assert not any(task.done() for task in held)
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 503") and b"\r\nretry-after: 7" in head
    assert b"connection: close" in head
    # Readiness and the HAProxy agent report it.
    status, body = admin_get(srv, "/ready")
    assert status == 503 and b"concurrency limit" in body
    assert agent_line(srv) == "up ready 1%\n"
    release.touch()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    # Below the limit again: served, ready.
    assert (await get(srv.port, "/")).status == 200
    assert admin_get(srv, "/ready")[0] == 200


async def test_a_sequential_client_is_not_shed_by_its_own_finished_request(
        start_zion, tmp_path):
    # Each response is complete while its task still works (a background
    # task): the next request, sent at once on the same connection, is not
    # in flight alongside anything, so it is served, never shed.
    release = tmp_path / "release"
    srv = serve(start_zion, "supervise_app:app", "--limit-concurrency", "1", workers=1,
                env={"ZION_TEST_RELEASE": str(release)})
    try:
        async with _client(srv, http2=False) as client:
            statuses = [(await client.get("/answer-then-hold")).status_code for _ in range(3)]
    finally:
        release.touch()
    assert statuses == [200, 200, 200]


async def test_http2_streams_past_the_limit_get_503_and_the_connection_stays(
        start_zion, tmp_path):
    release = tmp_path / "release"
    srv = serve(start_zion, "supervise_app:app", "--limit-concurrency", "2",
                "--admin", "127.0.0.1:0", workers=1, env={"ZION_TEST_RELEASE": str(release)})
    base = f"https://127.0.0.1:{srv.port}"
    # nghttp sends the three requests in one write: counted one by one all the same.
    out = await asyncio.to_thread(subprocess.run, [
        "nghttp", "-nv", f"{base}/slow?s=3", f"{base}/slow?s=3&b", f"{base}/?third"],
        capture_output=True, text=True, timeout=60)
    third = re.search(r"recv \(stream_id=17\) :status: (\d+)", out.stdout)
    assert third and third.group(1) == "503", out.stdout
    # At once: before either slow answer, not once they are done.
    assert out.stdout.index(":status: 503") < out.stdout.index(":status: 200"), out.stdout
    assert re.search(r"recv \(stream_id=17\) retry-after: 1", out.stdout)
    assert out.stdout.count(":status: 200") == 2
    # The h2 library on one connection: two held streams, a third is shed, a
    # fourth once they are done is served on the same connection.
    client, reader, writer = await open_tls(srv.port)
    held = [client.request(path="/hold"), client.request(path="/hold?b")]
    writer.write(client.h2.data_to_send())
    await asyncio.to_thread(wait_for, lambda: _admin_inflight(srv) == 2, 30, "two in flight")
    shed_sid = client.request(path="/")
    await pump(client, reader, writer, lambda: client.responses[shed_sid].ended)
    assert client.responses[shed_sid].status == 503
    assert client.responses[shed_sid].header(b"retry-after") == b"1"
    assert not any(client.responses[sid].status for sid in held)
    release.touch()
    await pump(client, reader, writer, lambda: all(client.responses[sid].ended for sid in held))
    again = client.request(path="/")
    await pump(client, reader, writer, lambda: client.responses[again].ended)
    assert [client.responses[sid].status for sid in (*held, again)] == [200, 200, 200]
    await close(writer)
