"""A real browser: headless Chromium loads a page from zion over HTTPS whose
script opens wss:// back to the same origin and round-trips a message."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# In CI a missing browser is a setup bug, not a reason to skip.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium (scripts/setup.sh installs it)")
def test_browser_page_round_trips_a_websocket_message(start_zion):
    srv = start_zion("fw_browser:app", workers=1)
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
         # virtual time lets the page's script run to completion before the dump
         "--virtual-time-budget=10000", "--dump-dom", f"https://127.0.0.1:{srv.port}/"],
        capture_output=True, text=True, timeout=45)
    assert '<p id="out">got:echo:ping from the browser</p>' in out.stdout, out.stderr[-2000:]
