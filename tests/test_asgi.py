"""ASGI apps through real frameworks (Starlette, FastAPI) and the lifespan protocol."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import get, wait_for


@pytest.fixture
def starlette(start_zion, tmp_path):
    events = tmp_path / "events"
    srv = start_zion("starlette_app:app", env={"ZION_TEST_EVENTS": str(events)})
    srv.events_file = events
    return srv


async def test_starlette_routes_and_bodies(starlette):
    async with httpx.AsyncClient(verify=False, base_url=f"https://127.0.0.1:{starlette.port}",
                                 http2=False) as client:
        resp = await client.get("/")
        assert resp.status_code == 200 and resp.text == "Hello, world!"
        assert resp.http_version == "HTTP/1.1"
        body = b"z" * 300_000
        resp = await client.post("/echo?a=1&b=%20x", content=body)
        data = resp.json()
        assert data["length"] == len(body) and data["method"] == "POST"
        assert data["query"] == "a=1&b=+x"
        assert (await client.get("/state")).json() == {"greeting": "hello from lifespan"}
        assert (await client.get("/missing")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
        # The worker survives an app exception and keeps serving.
        assert (await client.get("/")).status_code == 200


async def test_fastapi_unchanged(start_zion):
    srv = start_zion("fastapi_app:app")
    async with httpx.AsyncClient(verify=False, base_url=f"https://127.0.0.1:{srv.port}") as c:
        assert (await c.get("/items/5?q=x")).json() == {"item_id": 5, "q": "x"}
        resp = await c.post("/items", json={"name": "pen", "price": 1.5})
        assert resp.json() == {"name": "pen", "price": 1.5, "ok": True}
        assert (await c.post("/items", json={"name": 1})).status_code == 422


async def test_lifespan_startup_and_shutdown_per_worker(starlette):
    lines = starlette.events_file.read_text().split()
    assert lines.count("startup") == 2  # one per worker, before it accepts
    assert starlette.stop() == 0
    lines = starlette.events_file.read_text().split()
    assert lines.count("shutdown") == 2


async def test_app_without_lifespan_support(start_zion):
    srv = start_zion("raw_app:no_lifespan")
    assert (await get(srv.port, "/")).body == b"ok"


def test_app_that_does_not_import_stops_master(start_zion):
    srv = start_zion("broken_app:app", ready=False)
    code = srv.proc.wait(30)
    assert code == 3
    fatal = srv.events("fatal")
    assert len(fatal) == 1 and "cannot start" in fatal[0]["error"]
    boot = srv.events("worker_boot_failed")
    error = boot[0]["error"]
    # the app's own file and line, not importlib's frames
    assert "importing 'broken_app' failed" in error and "importlib" not in error
    assert 'broken_app.py", line 1' in error and "on purpose" in error


def test_lifespan_startup_failed_stops_master(start_zion):
    srv = start_zion("failing_lifespan:app", ready=False)
    assert srv.proc.wait(30) == 3
    assert "database unreachable" in srv.events("worker_boot_failed")[0]["error"]


def test_missing_attribute(start_zion):
    srv = start_zion("raw_app:nope", ready=False)
    assert srv.proc.wait(30) == 3
    wait_for(lambda: srv.events("worker_boot_failed"), 5, "boot failure line")
    assert "has no attribute 'nope'" in srv.events("worker_boot_failed")[0]["error"]
