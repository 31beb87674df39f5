"""A real browser: headless Chromium loads a page from zion over HTTPS whose
script opens wss:// back to the same origin and round-trips a message. The
test reads the page through the DevTools protocol, polling with a deadline
(a DOM dump after a virtual-time budget races the real network)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest
import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# In CI a missing browser is a setup bug, not a reason to skip.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium (scripts/setup.sh installs it)")
async def test_browser_page_round_trips_a_websocket_message(start_zion, tmp_path):
    srv = start_zion("fw_browser:app", workers=1)
    assert CHROMIUM is not None
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
         "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
         f"https://127.0.0.1:{srv.port}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        devtools = await asyncio.wait_for(asyncio.to_thread(_devtools_port, browser), 30)
        text = await asyncio.wait_for(_page_result(devtools), 30)
        protocol = await asyncio.wait_for(_page_result(
            devtools, "performance.getEntriesByType('navigation')[0].nextHopProtocol"), 30)
    finally:
        browser.kill()
        browser.wait(10)
        assert browser.stderr is not None
        browser.stderr.close()
    # The WebSocket is a stream of the page's HTTP/2 connection (RFC 8441).
    assert text == "got:echo:ping from the browser (HTTP/2)"
    assert protocol == "h2"  # HTTP/2 is on by default and Chromium offers it first


def _devtools_port(browser: subprocess.Popen[str]) -> int:
    assert browser.stderr is not None
    for line in browser.stderr:
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError("chromium exited without opening DevTools")


_OUT = "document.getElementById('out') && document.getElementById('out').textContent"


async def _page_result(port: int, expression: str = _OUT) -> str:
    """Poll `expression` in the page (by default its #out element) until it
    is a string other than "waiting"."""
    while True:
        targets = json.loads(await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5).read()))
        pages = [t for t in targets if t.get("type") == "page" and "webSocketDebuggerUrl" in t]
        if pages:
            break
        await asyncio.sleep(0.05)
    async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as cdp:
        for call in range(1, 10_000):
            await cdp.send(json.dumps({"id": call, "method": "Runtime.evaluate",
                                       "params": {"expression": expression}}))
            while True:
                reply = json.loads(await cdp.recv())
                if reply.get("id") == call:
                    break
            value = reply.get("result", {}).get("result", {}).get("value")
            if isinstance(value, str) and value != "waiting":
                return value
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")
