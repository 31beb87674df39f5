"""--reload: saving a source file reloads the workers with no failed request."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from structlog.testing import capture_logs

from tests.conftest import APPS, get, wait_for
from zion.supervisor.reloader import FileWatcher, watch_dirs

APP_V1 = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"VERSION"})
'''


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_saving_a_file_reloads_without_dropping_a_request(start_zion, tmp_path):
    (tmp_path / "live_app.py").write_text(APP_V1.replace("VERSION", "v1"))
    shutil.copy(APPS / "raw_app.py", tmp_path / "unrelated.py")
    srv = start_zion("live_app:app", "--reload", "--app-dir", str(tmp_path), cwd=tmp_path)
    await asyncio.to_thread(srv.wait_event, "reload_watching")
    old = set(srv.worker_pids())
    failures: list[BaseException] = []
    bodies: list[bytes] = []
    stop = False

    async def hammer() -> None:
        while not stop:
            try:
                bodies.append((await get(srv.port, "/")).body)
            except Exception as exc:
                failures.append(exc)

    clients = [asyncio.create_task(hammer()) for _ in range(4)]
    try:
        await until(lambda: len(bodies) >= 20, 20, "requests to the first version")
        (tmp_path / "live_app.py").write_text(APP_V1.replace("VERSION", "v2"))
        # Keep the clients going until the old workers have drained and exited.
        await until(lambda: b"v2" in bodies and not set(srv.worker_pids()) & old, 20,
                    "the new code to answer and the old workers to exit")
    finally:
        stop = True
        await asyncio.gather(*clients)
    assert failures == []
    assert set(bodies) == {b"v1", b"v2"} and bodies.index(b"v2") >= 20
    assert (await get(srv.port, "/")).body == b"v2"
    assert len(srv.events("reload_complete")) == 1  # one save, one reload
    assert srv.events("reload_files_changed")[0]["files"] == ["live_app.py"]


def test_watched_dirs_default_to_the_app_dir_then_the_working_dir():
    assert watch_dirs(os.pathsep.join(["a", "", "b"]), "app") == ["a", "b"]
    assert watch_dirs("", "app") == ["app"]
    assert watch_dirs("", "") == [os.getcwd()]


def test_a_python_file_change_raises_the_flag_and_wakes_the_loop(tmp_path):
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    watcher = FileWatcher([str(tmp_path)], wake_w)
    try:
        with capture_logs() as logs:
            watcher.start()
            wait_for(watcher.watching.is_set, 10, "the watch to be in place")
            assert not watcher.take()
            (tmp_path / "notes.txt").write_text("not code")
            (tmp_path / "mod.py").write_text("x = 1\n")
            wait_for(watcher.take, 10, "the change to be seen")
        assert os.read(wake_r, 16).startswith(b"w")
        assert not watcher.take()  # once per batch
        changed = [f for e in logs if e["event"] == "reload_files_changed" for f in e["files"]]
        assert [Path(f).name for f in changed] == ["mod.py"]  # *.py only
    finally:
        watcher.stop()
        os.close(wake_r)
        os.close(wake_w)


def test_reload_include_and_exclude_globs(tmp_path):
    """--reload-include "*.html" adds templates; --reload-exclude drops a
    directory's Python files and whatever else it names."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    (tmp_path / "templates").mkdir()
    (tmp_path / "generated").mkdir()
    watcher = FileWatcher([str(tmp_path)], wake_w, ["*.py", "*.html"],
                          ["generated/*.py", "*.min.html"])
    try:
        with capture_logs() as logs:
            watcher.start()
            wait_for(watcher.watching.is_set, 10, "the watch to be in place")
            (tmp_path / "generated" / "out.py").write_text("x = 1\n")
            (tmp_path / "templates" / "app.min.html").write_text("<p>")
            (tmp_path / "notes.txt").write_text("not code")
            (tmp_path / "templates" / "page.html").write_text("<p>")
            wait_for(watcher.take, 10, "the template change to be seen")
        changed = [f for e in logs if e["event"] == "reload_files_changed" for f in e["files"]]
        assert [Path(f).name for f in changed] == ["page.html"], changed
    finally:
        watcher.stop()
        os.close(wake_r)
        os.close(wake_w)


def test_reload_globs_from_the_command_line(start_zion, tmp_path):
    (tmp_path / "live_app.py").write_text(APP_V1.replace("VERSION", "v1"))
    srv = start_zion("live_app:app", "--reload", "--app-dir", str(tmp_path), "--reload-include",
                     "*.html", "--reload-include", "*.toml", "--reload-exclude", "skip_*.py",
                     cwd=tmp_path, workers=1)
    line = srv.wait_event("reload_watching")
    assert line["include"] == ["*.py", "*.html", "*.toml"] and line["exclude"] == ["skip_*.py"]
    (tmp_path / "skip_me.py").write_text("x = 1\n")
    (tmp_path / "page.html").write_text("<p>")
    done = srv.wait_event("reload_files_changed")
    assert done["files"] == ["page.html"], done
