"""Accept errors in the log: at most one line a second, with the count.

Two paths take connections in a worker, and they fail differently:

- The PROXY-protocol listener calls accept(2) itself: each failure (EMFILE,
  ENFILE, ENOBUFS, ENOMEM, ...) is counted exactly; `accept_failed` says
  how many since the last line.
- loop.create_server (uvloop over libuv) never tells: libuv's
  uv__server_io meets EMFILE/ENFILE with its "EMFILE trick" (it closes a
  descriptor it keeps in reserve, accepts every queued connection and closes
  it at once, then takes the reserve back), and uvloop drops the OSError of
  the listen callback without calling the loop's exception handler. The
  clients see their connection closed, and the server logged nothing. So a
  probe, once a second: if this process cannot open one more descriptor, the
  next accept(2) fails too. `accept_failing` then says so, with the limit and
  for how many seconds in a row, until a probe succeeds (`accept_recovered`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import time
from collections import Counter
from collections.abc import Callable

from zion.log import get_logger

log = get_logger("zion.http")

INTERVAL = 1.0  # seconds: at most one line per kind per interval
# accept(2) failures that mean "out of resources", not "a bad connection".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _name(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _hint(err: int) -> str | None:
    if err == errno.EMFILE:
        return ("raise the open-files limit of the workers (ulimit -n, systemd LimitNOFILE=, "
                f"now {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
    if err == errno.ENFILE:
        return "the whole system is out of file descriptors (fs.file-max)"
    if err in (errno.ENOBUFS, errno.ENOMEM):
        return "the kernel is out of socket memory"
    return None


class AcceptErrors:
    """Counts accept(2) failures; logs the first at once, then at most once
    per interval with the count since the previous line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 interval: float = INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self.pending: Counter[int] = Counter()
        self.last_line = -interval
        self.total = 0

    def failed(self, err: int) -> None:
        self.pending[err] += 1
        self.total += 1
        self.flush()

    def flush(self) -> None:
        """Log what is pending, if a line is due (also from a timer, so a
        burst's tail is not held until the next failure)."""
        now = self.clock()
        if not self.pending or now - self.last_line < self.interval:
            return
        for err, count in self.pending.items():
            log.warning("accept_failed", error=_name(err), count=count, total=self.total,
                        hint=_hint(err))
        self.pending.clear()
        self.last_line = now


def out_of_descriptors() -> int | None:
    """The errno if this process cannot open one more descriptor, else None
    (a dup of stderr, which the worker logs to: two system calls)."""
    try:
        fd = os.dup(2)
    except OSError as exc:
        return exc.errno if exc.errno in (errno.EMFILE, errno.ENFILE) else None
    os.close(fd)
    return None


class DescriptorProbe:
    """Once an interval: is the worker out of descriptors (so libuv is
    closing every new connection)? One line when it starts, one a second
    while it lasts (with for how long), one when it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = INTERVAL,
                 probe: Callable[[], int | None] = out_of_descriptors) -> None:
        self.loop = loop
        self.interval = interval
        self.probe = probe
        self.since: float | None = None
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.handle = self.loop.call_later(self.interval, self._check)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _check(self) -> None:
        err = self.probe()
        now = time.monotonic()
        if err is not None:
            if self.since is None:
                self.since = now
            log.warning("accept_failing", error=_name(err), for_s=round(now - self.since, 1),
                        detail="libuv closes each new connection at once while the worker "
                        "cannot open a descriptor", hint=_hint(err))
        elif self.since is not None:
            log.info("accept_recovered", after_s=round(now - self.since, 1))
            self.since = None
        self.start()
