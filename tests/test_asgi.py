"""ASGI apps through real frameworks (Starlette, FastAPI) and the lifespan protocol."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import APPS, get, wait_for


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


# -- app loading (fast, in-process) ------------------------------------------

def test_load_app_shapes(monkeypatch):
    from zion.asgi import load_app
    from zion.errors import WorkerBootError

    monkeypatch.syspath_prepend(str(APPS))
    assert load_app("loading.shapes:asgi3").__name__ == "asgi3"
    assert load_app("loading.shapes:factory", factory=True).__name__ == "asgi3"
    with pytest.raises(WorkerBootError, match="looks like an app factory; add --factory"):
        load_app("loading.shapes:factory")
    with pytest.raises(WorkerBootError, match="takes 2 positional arguments"):
        load_app("loading.shapes:wsgi_like")
    with pytest.raises(WorkerBootError, match="not callable"):
        load_app("loading.shapes:not_callable")
    with pytest.raises(WorkerBootError, match="is a class"):
        load_app("loading.shapes:AppClass")
    with pytest.raises(WorkerBootError, match="module:attribute"):
        load_app("loading.shapes")
    with pytest.raises(WorkerBootError, match="no module named 'nowhere_at_all'"):
        load_app("nowhere_at_all:app")


async def test_asgi2_app_is_adapted(monkeypatch):
    from zion.asgi import load_app

    monkeypatch.syspath_prepend(str(APPS))
    app = load_app("loading.shapes:asgi2")
    sent = []

    async def send(msg):
        sent.append(msg)

    await app({"type": "http"}, None, send)  # type: ignore[arg-type]
    assert sent[-1]["body"] == b"asgi2"


# -- app loading through `zion serve` ----------------------------------------

async def test_factory_and_app_dir_through_serve(start_zion, tmp_path):
    srv = start_zion("loading.shapes:factory", "--factory", "--app-dir", str(APPS),
                     cwd=tmp_path)
    assert (await get(srv.port, "/")).body == b"asgi3"


def test_factory_without_flag_is_one_clear_boot_error(start_zion):
    srv = start_zion("loading.shapes:factory", ready=False)
    assert srv.proc.wait(30) == 3
    boot = srv.events("worker_boot_failed")
    assert boot and "add --factory" in boot[0]["error"]


def test_lifespan_on_requires_lifespan_support(start_zion):
    srv = start_zion("loading.shapes:asgi3", "--lifespan", "on", ready=False)
    assert srv.proc.wait(30) == 3
    boot = srv.events("worker_boot_failed")
    assert boot and "does not support lifespan" in boot[0]["error"]


async def test_lifespan_off_skips_startup(start_zion, tmp_path):
    events = tmp_path / "events"
    srv = start_zion("starlette_app:app", "--lifespan", "off",
                     env={"ZION_TEST_EVENTS": str(events)})
    assert (await get(srv.port, "/")).status == 200
    assert not events.exists() or "startup" not in events.read_text()
