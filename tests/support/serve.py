"""Starting a `zion serve` whose start-up time is not what a test measures."""

from __future__ import annotations

from typing import Any

from tests.conftest import ZionProcess


def serve(start_zion: Any, *args: str, **kwargs: Any) -> ZionProcess:
    """start_zion, waiting up to 120 s for it to be ready: start-up compiles
    the demux program, which alone can pass conftest's 30 s on a machine
    loaded many times over."""
    return start_zion(*args, ready=False, **kwargs).wait_ready(120)  # type: ignore[no-any-return]
