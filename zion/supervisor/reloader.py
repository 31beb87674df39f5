"""--reload: watch source files and ask the master for a reload.

The watcher thread only raises a flag and wakes the master's select(); the
master runs the same zero-downtime reload as SIGHUP when no other reload is
in flight, so a saved file never drops a request and a burst of saves while
a reload runs ends in one more reload, not a lost change.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from watchfiles import Change, DefaultFilter, watch

from zion.log import get_logger

logger = get_logger("zion.reloader")

# How long the watcher thread waits in watchfiles' Rust loop before coming back
# with nothing; the first such return tells that the watch is in place.
_SETUP_PROBE_MS = 500


class GlobFilter(DefaultFilter):
    """--reload-include / --reload-exclude (uvicorn's): a change counts when
    its path matches an include glob and no exclude glob. A glob matches from
    the right (pathlib's PurePath.match): "*.html" anywhere, "templates/*.html"
    in a directory of that name. watchfiles' defaults still apply underneath
    (.git, __pycache__, .venv, node_modules, editor swap files)."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        super().__init__()
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def __call__(self, change: Change, path: str) -> bool:
        p = Path(path)
        return (any(p.match(g) for g in self.include)
                and not any(p.match(g) for g in self.exclude)
                and super().__call__(change, path))


def globs(text: str) -> list[str]:
    return [g for g in text.split(os.pathsep) if g]


class FileWatcher:
    def __init__(self, dirs: Sequence[str], wake_fd: int, include: Sequence[str] = ("*.py",),
                 exclude: Sequence[str] = ()) -> None:
        self.dirs = [str(Path(d).resolve()) for d in dirs]
        self.filter = GlobFilter(include, exclude)
        self.wake_fd = wake_fd
        self.changed = threading.Event()
        self.watching = threading.Event()  # set once changes are being seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zion-reloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> bool:
        """True once per batch of changes since the last call."""
        if self.changed.is_set():
            self.changed.clear()
            return True
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        # watch() debounces: it yields once no change has arrived for 50 ms
        # (at most 1.6 s after the first), so an editor's save-rename-chmod or
        # a `git checkout` of many files is one batch, and one reload.
        # The first yield, a timeout or a change, comes from a watcher that is
        # set up; announcing it earlier would let a test (or a person) save a
        # file that is never seen.
        for changes in watch(*self.dirs, watch_filter=self.filter, stop_event=self._stop,
                             raise_interrupt=False, rust_timeout=_SETUP_PROBE_MS,
                             yield_on_timeout=True):
            if not self.watching.is_set():
                self.watching.set()
                logger.info("reload_watching", dirs=self.dirs, include=list(self.filter.include),
                            exclude=list(self.filter.exclude))
            if not changes:
                continue
            paths = sorted({os.path.relpath(p) for _, p in changes})
            logger.info("reload_files_changed", files=paths[:5], count=len(paths))
            self.changed.set()
            # A full pipe means the master is awake anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self.wake_fd, b"w")


def watch_dirs(reload_dirs: str, app_dir: str) -> list[str]:
    dirs = [d for d in reload_dirs.split(os.pathsep) if d]
    return dirs or [app_dir or os.getcwd()]
