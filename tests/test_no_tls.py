"""--no-tls: plain HTTP/1.1 behind a TLS-terminating proxy. No certificate is
read or made, scopes say http/ws, and the rest of the stack is unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess

import pytest
import websockets

from tests.conftest import close, read_response, wait_for
from tests.support.proxy_headers import ask, inet, raw_socket, v1, v2
from zion.errors import ConfigError
from zion.settings import load_settings

APP = "whoami_app:app"


async def plain_get(port: int, path: str = "/", headers: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n"
                     .encode())
        resp = await asyncio.wait_for(read_response(reader), 10)
    finally:
        await close(writer)
    return resp.status, resp.body


async def test_no_tls_serves_plain_http(start_zion, tmp_path):
    # A [tls] section naming files that are not there is fine: it is not read.
    config = tmp_path / "zion.toml"
    config.write_text('[tls]\ncertfile = "/nonexistent.pem"\nkeyfile = "/nonexistent.key"\n'
                      'cert_reqs = "required"\nca_certs = "/nonexistent-ca.pem"\n')
    state = tmp_path / "state"
    # (No demux: it would merge kernel headers into this fresh state dir.)
    srv = start_zion(APP, "--no-tls", "--config", str(config), "--no-bpf-demux",
                     env={"ZION_TLS_STATE_DIR": str(state)})
    assert srv.events("listening")[-1]["tls"] == "off"
    status, body = await plain_get(srv.port)
    facts = json.loads(body)
    assert status == 200 and facts["scheme"] == "http" and facts["tls"] is False
    assert facts["client"][0] == "127.0.0.1"
    # Built-ins, for a direct loopback client.
    assert await plain_get(srv.port, "/_zion/healthz") == (200, b"ok\n")
    status, body = await plain_get(srv.port, "/_zion/status")
    assert status == 200 and json.loads(body)["worker"] in (0, 1)
    # A TLS-terminating proxy in front says what the client used.
    status, body = await plain_get(srv.port, headers="x-forwarded-proto: https\r\n")
    assert json.loads(body)["scheme"] == "https"
    # No self-signed certificate was made.
    assert not state.exists()


async def test_no_tls_websocket_is_ws(start_zion):
    srv = start_zion(APP, "--no-tls", "--no-bpf-demux")
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=10) as ws:
        facts = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert facts["scheme"] == "ws" and facts["tls"] is False


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_no_tls_with_curl(start_zion):
    srv = start_zion(APP, "--no-tls", "--no-bpf-demux")
    out = subprocess.run(["curl", "-s", "--max-time", "10", f"http://127.0.0.1:{srv.port}/"],
                         capture_output=True, timeout=30)
    assert json.loads(out.stdout)["scheme"] == "http", out
    # HTTPS is not spoken there any more.
    out = subprocess.run(["curl", "-sk", "--max-time", "10", f"https://127.0.0.1:{srv.port}/"],
                         capture_output=True, timeout=30)
    assert out.returncode != 0


async def test_no_tls_with_proxy_protocol(start_zion):
    srv = start_zion(APP, "--no-tls", "--proxy-protocol", "auto", "--no-bpf-demux")
    sock = raw_socket(srv.port)
    # The header and the request in one write: the request is not lost.
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1111, 80))
                 + b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    reader, writer = await asyncio.open_connection(sock=sock)
    facts = (await asyncio.wait_for(read_response(reader), 10)).json()
    await close(writer)
    assert facts["client"] == ["203.0.113.7", 1111] and facts["scheme"] == "http"
    sock = raw_socket(srv.port)
    sock.sendall(v1("203.0.113.8", 2222))
    facts = await ask(sock, plain=True)
    assert facts["client"] == ["203.0.113.8", 2222] and facts["scheme"] == "http"


async def test_https_stays_the_default(start_zion):
    srv = start_zion(APP, "--no-bpf-demux")
    assert srv.events("listening")[-1]["tls"].startswith("self-signed:")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ValueError)):
        await plain_get(srv.port)


async def test_reload_switches_tls_and_proxy_protocol(start_zion, tmp_path):
    config = tmp_path / "zion.toml"
    config.write_text("[tls]\nenabled = false\n")
    srv = start_zion(APP, "--config", str(config), "--workers", "1", "--no-bpf-demux",
                     workers=None)
    assert json.loads((await plain_get(srv.port))[1])["scheme"] == "http"
    config.write_text('[tls]\nenabled = true\n[server]\nproxy_protocol = "v2"\n')
    srv.signal(signal.SIGHUP)
    await asyncio.to_thread(srv.wait_event, "reload_complete", 30)
    # Once the old worker is gone, only the new settings answer.
    await asyncio.to_thread(wait_for, lambda: len(srv.worker_pids()) == 1, 20, "one worker")
    sock = raw_socket(srv.port)
    sock.sendall(v2(addresses=inet("203.0.113.7", "192.0.2.1", 1, 443)))
    facts = await ask(sock)
    assert facts["scheme"] == "https" and facts["client"] == ["203.0.113.7", 1]


def test_no_tls_ignores_the_certificate_settings():
    settings = load_settings(cli={"tls": {"enabled": False, "certfile": "/x.pem",
                                          "cert_reqs": "required"}}, environ={})
    assert not settings.tls.enabled
    # With TLS the same keys are errors.
    for tls in ({"certfile": "/x.pem"}, {"cert_reqs": "required"}):
        with pytest.raises(ConfigError):
            load_settings(cli={"tls": tls}, environ={})


def test_no_tls_rotates_no_ticket_keys():
    from zion.supervisor.master import Master

    for enabled, rotates in ((False, False), (True, True)):
        settings = load_settings(cli={"tls": {"enabled": enabled}}, environ={})
        master = Master(settings, lambda s=settings: s)
        try:
            assert (master.rotate_at < float("inf")) is rotates
        finally:
            os.close(master.signals.wake_r)
            os.close(master.signals.wake_w)


async def test_websocket_over_a_proxied_plain_connection(start_zion):
    srv = start_zion(APP, "--no-tls", "--proxy-protocol", "v1", "--no-bpf-demux")
    sock = raw_socket(srv.port)
    sock.sendall(v1("203.0.113.9", 3333))
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", sock=sock,
                                  open_timeout=10) as ws:
        facts = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert facts["scheme"] == "ws" and facts["client"] == ["203.0.113.9", 3333]
