"""Built-in endpoints and the default page."""

from __future__ import annotations

import asyncio

from tests.conftest import close, connect, get, read_response
from zion.handlers.builtins import is_loopback


async def test_healthz(start_zion):
    srv = start_zion("starlette_app:app")
    resp = await get(srv.port, "/_zion/healthz")
    assert resp.status == 200 and resp.body == b"ok\n"
    assert (await get(srv.port, "/_zion/healthz", method="POST")).status == 405


async def test_status_json(start_zion):
    srv = start_zion(workers=2)
    status = (await get(srv.port, "/_zion/status")).json()
    assert status["worker"] in (0, 1) and status["pid"] in srv.worker_pids()
    assert status["demux"]["state"] in ("attached", "fallback")
    assert [w["worker"] for w in status["demux"]["workers"]] == [0, 1]


async def test_default_page_names_the_worker(start_zion):
    srv = start_zion(workers=2)
    resp = await get(srv.port, "/")
    assert resp.status == 200 and b"zion is running" in resp.body
    index = resp.headers["x-zion-worker"]
    assert f"Worker {index} (pid ".encode() in resp.body


def test_loopback_detection():
    assert is_loopback(("127.0.0.1", 1)) and is_loopback(("127.9.9.9", 1))
    assert is_loopback(("::1", 1)) and is_loopback(("::ffff:127.0.0.1", 1))
    assert not is_loopback(("10.0.0.1", 1)) and not is_loopback(("2001:db8::1", 1))
    assert not is_loopback(None)


async def test_access_log_off_by_default_and_on_with_flag(start_zion):
    quiet = start_zion()
    await get(quiet.port, "/_zion/healthz")
    assert not quiet.events("access")
    loud = start_zion("--access-log")
    await get(loud.port, "/_zion/healthz?x=1")
    from tests.conftest import wait_for
    line = wait_for(lambda: loud.events("access"), 10, "an access line")[0]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/_zion/healthz?x=1", 200)


def test_doctor_shows_running_workers(start_zion, state_dir):
    import subprocess
    import sys

    from tests.conftest import APPS, REPO
    srv = start_zion(workers=2)
    out = subprocess.run([sys.executable, "-m", "zion", "doctor", "--url",
                          f"https://127.0.0.1:{srv.port}"], capture_output=True, text=True,
                         timeout=120, cwd=APPS,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                              "ZION_TLS_STATE_DIR": str(state_dir)})
    assert f"running server https://127.0.0.1:{srv.port}: demux" in out.stdout, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert {int(r[1]) for r in rows} == set(srv.worker_pids())


def _netns_skip_reason() -> str | None:
    import os
    import shutil
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create a network namespace"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


def test_builtins_are_forbidden_to_a_non_loopback_client(start_zion):
    """A real client on another address: a test host in a network namespace
    of our own, joined to this one by a veth pair (10.213.x is ours alone)."""
    import os
    import subprocess
    import sys

    reason = _netns_skip_reason()
    if reason:
        import pytest
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"zion-t{tag}", f"zv{tag}a", f"zv{tag}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", "10.213.0.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "10.213.0.2/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        srv = start_zion("--host", "10.213.0.1")
        client = (
            "import ssl, sys, urllib.request, urllib.error\n"
            "ctx = ssl.create_default_context(); ctx.check_hostname = False\n"
            "ctx.verify_mode = ssl.CERT_NONE\n"
            "for path in ('/_zion/status', '/_zion/healthz'):\n"
            "    try:\n"
            "        r = urllib.request.urlopen(f'https://10.213.0.1:{sys.argv[1]}' + path,"
            " context=ctx, timeout=10); print(path, r.status)\n"
            "    except urllib.error.HTTPError as e:\n"
            "        print(path, e.code)\n")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", client,
                              str(srv.port)], capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == ["/_zion/status", "403", "/_zion/healthz", "403"], (
            out.stdout + out.stderr)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


async def test_builtins_are_forbidden_through_a_same_host_proxy(start_zion):
    """A loopback peer that forwards for someone else is not a direct client,
    whichever forwarding header it sends (trusted or not)."""
    srv = start_zion()
    for name, value in (("x-forwarded-for", "203.0.113.7"), ("forwarded", "for=203.0.113.7"),
                        ("x-real-ip", "203.0.113.7"), ("x-forwarded-proto", "https"),
                        ("x-forwarded-host", "example.com")):
        for path in ("/_zion/healthz", "/_zion/status"):
            resp = await get(srv.port, path, headers={name: value})
            assert resp.status == 403, (name, path)
    assert (await get(srv.port, "/_zion/healthz")).status == 200


async def test_healthz_reports_a_worker_at_max_connections(start_zion):
    srv = start_zion("raw_app:app", env={"ZION_LIMITS_MAX_CONNECTIONS": "3"}, workers=1)
    idle = [await connect(srv.port) for _ in range(2)]
    for _reader, writer in idle:  # a request each, so both are established and counted
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    for reader, _writer in idle:
        await read_response(reader)
    # Its own connection is the third: the worker is at the limit, and a fourth
    # client would get 503 - so the health check says so too.
    resp = await get(srv.port, "/_zion/healthz")
    assert resp.status == 503 and resp.body == b"overloaded: at max_connections\n"
    await asyncio.gather(*(close(writer) for _reader, writer in idle))
    for _ in range(100):
        if (await get(srv.port, "/_zion/healthz")).status == 200:
            break
    assert (await get(srv.port, "/_zion/healthz")).status == 200
