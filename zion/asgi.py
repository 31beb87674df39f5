"""Loading the ASGI application and running its lifespan protocol."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from typing import Any

from zion.errors import WorkerBootError
from zion.http.state import ASGIApp
from zion.log import get_logger

log = get_logger("zion.asgi")


def load_app(spec: str) -> ASGIApp:
    """Import "module:attr" (attr may be dotted); raise WorkerBootError."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the working directory
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise WorkerBootError(f"cannot import {module_name!r}: {exc!r}") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise WorkerBootError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise WorkerBootError(f"{spec} is not callable")
    if inspect.isclass(obj):
        raise WorkerBootError(f"{spec} is a class; give an ASGI application instance")
    return obj  # type: ignore[no-any-return]


class Lifespan:
    """ASGI lifespan: startup before the worker accepts, shutdown after drain.

    An app that raises on the lifespan scope before sending anything does not
    support lifespan; that is fine and logged at debug. A startup.failed is a
    boot error: the worker can never serve.
    """

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: dict[str, asyncio.Event] = {
            "startup": asyncio.Event(), "shutdown": asyncio.Event()}
        self.failed: str | None = None
        self.supported = True
        self.task: asyncio.Task[None] | None = None

    async def startup(self, timeout: float) -> None:
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self.queue.put({"type": "lifespan.startup"})
        await self._wait("startup", timeout)
        if self.failed is not None:
            raise WorkerBootError(f"lifespan startup failed: {self.failed}")

    async def shutdown(self, timeout: float) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        await self.queue.put({"type": "lifespan.shutdown"})
        await self._wait("shutdown", timeout)
        if self.failed is not None:
            log.error("lifespan_shutdown_failed", message=self.failed)

    async def _wait(self, phase: str, timeout: float) -> None:
        assert self.task is not None
        done_event = asyncio.ensure_future(self.events[phase].wait())
        try:
            await asyncio.wait({done_event, self.task}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            done_event.cancel()
        if not self.events[phase].is_set() and self.supported and self.failed is None:
            if self.task.done():
                return
            raise WorkerBootError(f"lifespan {phase} did not finish in {timeout:.0f}s")

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        started = False

        async def receive() -> dict[str, Any]:
            nonlocal started
            started = True
            return await self.queue.get()

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            phase = kind.split(".")[1]
            if kind.endswith(".failed"):
                self.failed = message.get("message", "") or "(no message)"
            self.events[phase].set()

        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if not started:
                self.supported = False
                log.debug("lifespan_unsupported", error=repr(exc))
            else:
                self.failed = self.failed or repr(exc)
                log.error("lifespan_error", error=repr(exc), exc_info=True)
        finally:
            for event in self.events.values():
                event.set()
