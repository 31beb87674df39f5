"""Fixtures: real `zion serve` processes on ephemeral ports, real TLS clients.

Nothing here sleeps for a fixed time: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


# What a stop of a zion the test left running may take at the test's end: it
# drains in ~0.2 s here (0.9 s at most over the suite); a client the test left
# silent can hold a TLS close for up to 2 s (zion/worker.py), load adds more.
STOP_SLOW = 5.0
STOP_LIMIT = 15.0  # then it is killed


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ZionProcess:
    """A running `zion serve`, its JSON log lines, and its port."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path,
                 wrapper: list[str] | None = None) -> None:
        cmd = [*(wrapper or []), sys.executable, "-m", "zion", "serve", "--log-format", "json",
               *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        # Closed here at its end: a worker that outlives its master (and the
        # test) holds the pipe open past close(), which cannot close it then.
        with self.proc.stdout:
            for raw in self.proc.stdout:
                text = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    self.raw.append(text)
                    with contextlib.suppress(ValueError):
                        self.lines.append(json.loads(text))

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [ln for ln in self.lines if ln.get("event") == name]

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            found = self.events(name)
            if not found and self.proc.poll() is not None:
                raise AssertionError(
                    f"zion exited ({self.proc.returncode}) before {name}:\n" + self.log_text())
            return found[-1] if found else None

        return wait_for(seen, timeout, f"log event {name}")  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30.0) -> ZionProcess:
        self.port = int(self.wait_event("listening", timeout)["port"])
        self.wait_event("workers_ready", timeout)
        return self

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.raw)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0, slow: str | None = None) -> int:
        """SIGTERM, then its exit status. A stop that takes over STOP_SLOW
        fails unless `slow` says why this one may (a defect, named): a slow
        stop is zion's defect, not the test's, and a test that stopped zion
        itself allowed up to `timeout` silently. Past `timeout` zion is
        killed, and that fails too."""
        began = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            message = (f"zion (pid {self.pid}) was still running {timeout:.0f} s after "
                       f"SIGTERM (killed):\n{self.log_text()}")
            raise AssertionError(message) from None
        finally:
            self.close()
        took = time.monotonic() - began
        if took > STOP_SLOW and slow is None:
            raise AssertionError(f"zion (pid {self.pid}) took {took:.1f} s to stop after "
                                 f"SIGTERM:\n{self.log_text()}")
        return code

    def close(self) -> None:
        """The log pipe, once the reader has seen its end (a worker that outlives
        its master keeps it open): unclosed, it is a ResourceWarning at GC."""
        self._reader.join(5)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One self-signed certificate and one merged header tree for the session.
    return tmp_path_factory.mktemp("zion-state")


@pytest.fixture
def zion_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZION_")}
    env["ZION_TLS_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    env.pop("NOTIFY_SOCKET", None)
    # zion's own leaks too: a socket or pipe the server leaves unclosed is a
    # ResourceWarning in its log (Python ignores them by default), which
    # start_zion's teardown fails on. "always": with "default" the worker did
    # not log uvloop's unclosed-transport warning at loop.close() (seen).
    env["PYTHONWARNINGS"] = "always::ResourceWarning"
    return env


@pytest.fixture
def start_zion(zion_env: dict[str, str], request: pytest.FixtureRequest
               ) -> Iterator[Callable[..., ZionProcess]]:
    started: list[ZionProcess] = []
    # A known slow stop, named with its defect: allowed up to STOP_LIMIT.
    marker = request.node.get_closest_marker("slow_stop")
    known_slow = (marker.args[0] if marker.args else "slow_stop") if marker else None

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True,
              workers: int | None = 2, wrapper: list[str] | None = None,
              cwd: Path | None = None) -> ZionProcess:
        full_env = {**zion_env, **(env or {})}
        # workers=None leaves the count to --config (a reload re-reads it).
        argv = ["--port", "0", *(["--workers", str(workers)] if workers else []), *args]
        proc = ZionProcess(argv, full_env, cwd or APPS, wrapper)
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    slow = []
    for proc in started:
        if proc.proc.poll() is None:
            try:
                proc.stop(timeout=STOP_LIMIT, slow=known_slow)
            except AssertionError as slow_stop:
                slow.append(str(slow_stop))
        proc.close()
    leaks = [line for proc in started for line in proc.log_text().splitlines()
             if "ResourceWarning" in line]
    assert not leaks, "zion left a socket, pipe or transport unclosed:\n" + "\n".join(leaks)
    # A slow stop is a defect of zion, not of the test: `systemctl stop` and
    # `podman stop` wait for it (a SIGTERM lost at boot hid here once, when a
    # stop that timed out was ignored).
    assert not slow, "a slow stop at the test's end:\n" + "\n\n".join(slow)


def client_context(alpn: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def inflight(port: int) -> int:
    """Requests in flight across all workers, from /_zion/status (blocking)."""
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_zion/status",
                                context=client_context(), timeout=5) as resp:
        return sum(w["inflight"] for w in json.load(resp)["demux"]["workers"])


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> Response:
    """Read one HTTP/1.1 response: Content-Length, chunked, or until close."""
    raw_head = await reader.readuntil(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return Response(status, headers, b"", raw_head)
    if head_request or status in (204, 304):
        return Response(status, headers, b"", raw_head)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return Response(status, headers, body, raw_head)


async def connect(port: int, host: str = "127.0.0.1", ctx: ssl.SSLContext | None = None,
                  session: ssl.SSLSession | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, ssl=ctx or client_context(),
                                         server_hostname="localhost", ssl_handshake_timeout=10,
                                         **({"session": session} if session else {}))


async def close(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Close a client connection and wait until it is closed. A transport left
    closing (a TLS close_notify exchange not finished) when the test's loop
    ends is an unclosed socket at GC, a ResourceWarning; a peer that never
    answers the close gets a reset after `timeout`."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except (TimeoutError, OSError):  # ssl.SSLError and resets are OSErrors
        writer.transport.abort()
        await asyncio.sleep(0)  # abort closes the socket in a callback of the next loop pass


async def get(port: int, path: str = "/", headers: dict[str, str] | None = None,
              method: str = "GET", body: bytes = b"", host: str = "127.0.0.1") -> Response:
    reader, writer = await connect(port, host)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body:
            extra += f"content-length: {len(body)}\r\n"
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: localhost\r\n{extra}"
                     f"connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, method == "HEAD"), 10)
    finally:
        await close(writer)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    return b"".join(chunks)


# -- each test collects its own garbage ------------------------------------------
# A socket, pipe or transport a test leaves unclosed warns (ResourceWarning, an
# error here) when it is freed. Inside a reference cycle (an event loop and its
# transports always are one) that is at the next cyclic collection, which runs
# whenever allocations pass a threshold: in some later, unrelated test. So every
# test collects at its teardown and a leak fails the test that made it, as an
# error at its teardown (pytest's unraisable-exception check runs after the
# fixtures'). It runs after pytest-asyncio has closed and dropped the test's
# loop (that runner fixture is set up after the autouse ones, so torn down
# before them): what the loop held is garbage only then.
#
# A full collection walks every object the process tracks (~130k once the
# frameworks are imported; ~0.1 s on a loaded machine). After each collection
# the survivors are frozen (gc.freeze: a generation no collection walks), so
# the next test's walks only what was made since (618 tests: 0.3 s in all).
# What a test made that outlives it is frozen with the rest; should it become
# garbage later (a module-scoped fixture's server), each module's teardown
# unfreezes and collects everything (65 modules: ~6 s under load), the
# session's end the rest.

def _collect_all() -> None:
    gc.unfreeze()
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _collect_session_garbage() -> Iterator[None]:
    yield
    _collect_all()


@pytest.fixture(scope="module", autouse=True)
def _collect_module_garbage(_collect_session_garbage: None) -> Iterator[None]:
    yield
    _collect_all()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage(_collect_module_garbage: None) -> Iterator[None]:
    yield
    gc.collect()
    gc.freeze()
