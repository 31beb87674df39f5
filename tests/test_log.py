"""zion/log.py against a real server: with --log-format json every line is
JSON (Python warnings and the app's own loggers included), and --log-config
configures the app's loggers."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import client_context, wait_for


def _get(port: int, path: str = "/") -> int:
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=client_context(),
                                timeout=10) as resp:
        return int(resp.status)


def _not_json(raw: list[str]) -> list[str]:
    bad = []
    for line in raw:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def test_every_line_is_json_warnings_and_app_loggers_included(start_zion):
    srv = start_zion("log_app:app", "--access-log", workers=1)
    assert _get(srv.port, "/?q=1") == 200
    warned = wait_for(lambda: len(found := [ln for ln in srv.lines
                                            if ln.get("logger") == "py.warnings"]) >= 2 and found,
                      what="both warnings as log lines")
    assert "log_app imported" in warned[0]["event"] and "per-request" in warned[1]["event"]
    line = wait_for(lambda: srv.events("app warning line"), what="the app's own logger")[0]
    assert line["logger"] == "log_app" and line["level"] == "warning"
    assert srv.stop() == 0
    assert _not_json(srv.raw) == []


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".ini"])
def test_log_config_sets_the_apps_loggers(start_zion, tmp_path: Path, suffix: str):
    """The file raises "log_app" to WARNING: its info line is gone, its
    warning stays, and zion's own lines (not named in the file) are kept."""
    path = tmp_path / f"logging{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"version": 1, "loggers": {"log_app": {"level": "WARNING"}}}))
    elif suffix == ".yaml":
        path.write_text("version: 1\nloggers:\n  log_app:\n    level: WARNING\n")
    else:
        path.write_text("[loggers]\nkeys=root,log_app\n[handlers]\nkeys=\n[formatters]\nkeys=\n"
                        "[logger_root]\nhandlers=\n[logger_log_app]\nlevel=WARNING\n"
                        "qualname=log_app\nhandlers=\n")
    srv = start_zion("log_app:app", "--log-config", str(path), workers=1)
    assert _get(srv.port) == 200
    wait_for(lambda: srv.events("app warning line"), what="the app's warning")
    assert srv.stop() == 0
    assert srv.events("app info line") == []
    assert srv.events("worker_stopped") or srv.events("stopped") or srv.events("workers_ready")
    assert _not_json(srv.raw) == []
