"""An app that tries to reach its master: read its memory, ptrace it, and
reports its own credentials."""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206


def _try_mem(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.read(1)
        return "read"
    except OSError as exc:
        return type(exc).__name__


def _try_ptrace(pid: int) -> str:
    if _libc.ptrace(PTRACE_SEIZE, pid, 0, 0) == 0:
        return "seized"
    return os.strerror(ctypes.get_errno())


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    master = os.getppid()
    body = f"uid={os.getuid()} mem={_try_mem(master)} ptrace={_try_ptrace(master)}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
