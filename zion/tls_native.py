"""Two OpenSSL settings that Python 3.11's ssl module does not expose, set on
the context's own SSL_CTX through libssl's SSL_CTX_ctrl.

- The key-exchange groups. SSLContext.set_ecdh_curve takes one name (with
  OpenSSL 3 it calls SSL_CTX_set1_groups with a list of one), so it cannot
  say "X25519, P-256, P-384"; OpenSSL's default list also offers X448 and
  P-521, which Mozilla's "intermediate" profile leaves out.
  SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl(SSL_CTRL_SET_GROUPS_LIST).
- The server session-ID cache. It lives in each process's memory, so after
  fork a TLS 1.2 session made on one worker resumes only when the kernel
  happens to pick the same worker again. Turned off
  (SSL_CTX_set_session_cache_mode(SSL_SESS_CACHE_OFF), a macro over
  SSL_CTX_ctrl(SSL_CTRL_SET_SESS_CACHE_MODE)), a client that offers a session
  ID gets a full handshake on every worker, and clients resume with session
  tickets, whose keys every worker shares (zion/tls.py).

The SSL_CTX pointer is the first field after PyObject_HEAD in CPython's
PySSLContext (Modules/_ssl.c, unchanged since 3.0). The libssl used is the
one already mapped into this process by the _ssl module, and the pointer is
checked before use: SSL_CTX_get_options on it must return the options Python
reports for the context. If anything does not hold, nothing is set and the
caller says so in the log.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from pathlib import Path

# openssl/ssl.h (OpenSSL 3.0)
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_GROUPS_LIST = 92
SSL_SESS_CACHE_OFF = 0


class NativeUnavailable(Exception):
    """This Python or libssl does not allow the native calls; the message says why."""


def _mapped_libssl() -> str:
    """Path of the libssl the _ssl module is linked against, as mapped now."""
    import ssl as _  # noqa: F401  (maps libssl into the process)

    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if "/libssl.so" in path:
            return path
    raise NativeUnavailable("no libssl mapped in this process")


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        if sys.implementation.name != "cpython":
            raise NativeUnavailable(f"{sys.implementation.name} is not CPython")
        # dlopen of a library already loaded returns that same copy.
        lib = ctypes.CDLL(_mapped_libssl())
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        _LIB = lib
    return _LIB


def _ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise NativeUnavailable("no SSL_CTX pointer where CPython keeps it")
    if lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise NativeUnavailable("the SSL_CTX found does not match the context's options")
    return pointer


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384"): the key-exchange
    groups offered and accepted, TLS 1.2 and 1.3. ValueError: OpenSSL took none."""
    lib = _lib()
    pointer = _ctx_pointer(ctx, lib)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0,
                        ctypes.c_char_p(groups.encode("ascii"))) != 1:
        raise ValueError(f"OpenSSL accepts no group list {groups!r}")


def session_id_cache_off(ctx: ssl.SSLContext) -> None:
    lib = _lib()
    pointer = _ctx_pointer(ctx, lib)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != SSL_SESS_CACHE_OFF:
        raise NativeUnavailable("the session cache mode did not change")
