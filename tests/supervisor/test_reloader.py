"""--reload: saving a source file reloads the workers with no failed request."""

from __future__ import annotations

import asyncio
import shutil
import threading

from tests.conftest import APPS, get, wait_for

APP_V1 = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"VERSION"})
'''


async def test_saving_a_file_reloads_without_dropping_a_request(start_zion, tmp_path):
    (tmp_path / "live_app.py").write_text(APP_V1.replace("VERSION", "v1"))
    shutil.copy(APPS / "raw_app.py", tmp_path / "unrelated.py")
    srv = start_zion("live_app:app", "--reload", "--app-dir", str(tmp_path), cwd=tmp_path)
    assert (await get(srv.port, "/")).body == b"v1"
    failures: list[BaseException] = []
    bodies: set[bytes] = set()
    stop = threading.Event()

    async def hammer() -> None:
        while not stop.is_set():
            try:
                bodies.add((await get(srv.port, "/")).body)
            except Exception as exc:
                failures.append(exc)

    clients = [asyncio.create_task(hammer()) for _ in range(4)]
    srv.wait_event("reload_watching")
    (tmp_path / "live_app.py").write_text(APP_V1.replace("VERSION", "v2"))

    async def answered_v2() -> None:
        while b"v2" not in bodies:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(answered_v2(), 20)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert (await get(srv.port, "/")).body == b"v2"
    wait_for(lambda: srv.events("reload_files_changed"), what="the change to be logged")
