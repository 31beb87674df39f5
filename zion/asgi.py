"""Loading the ASGI application and running its lifespan protocol."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import traceback
from typing import Any

from zion.errors import WorkerBootError
from zion.http.asgi_types import (
    ASGIApp,
    ASGIReceiveCallable,
    ASGISendCallable,
    LifespanReceiveEvent,
    LifespanScope,
    LifespanSendEvent,
    Scope,
)
from zion.log import get_logger

log = get_logger("zion.asgi")


def load_app(spec: str, factory: bool = False, app_dir: str = "") -> ASGIApp:
    """Import "module:attr" (attr may be dotted) like uvicorn does.

    `app_dir` goes first on sys.path (default: the working directory, as
    `python -m` would). With `factory`, attr is called with no arguments and
    returns the app. An ASGI 2 app (scope -> coroutine(receive, send)) is
    adapted; anything else that cannot be an ASGI 3 app is a boot error now,
    not a 500 for every request later. Raises WorkerBootError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise WorkerBootError(f"APP must look like module:attribute, got {spec!r}")
    path = os.path.abspath(app_dir) if app_dir else ""
    if path not in sys.path and not (not path and "." in sys.path):
        sys.path.insert(0, path)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            where = f" in {path or os.getcwd()}" + ("" if app_dir else " (see --app-dir)")
            raise WorkerBootError(f"no module named {module_name!r}{where}") from None
        raise WorkerBootError(f"importing {module_name!r} failed:\n{_user_traceback(exc)}"
                              ) from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise WorkerBootError(f"module {module_name!r} has no attribute {attr!r}") from None
    if factory:
        if not callable(obj):
            raise WorkerBootError(f"--factory: {spec} is not callable")
        try:
            obj = obj()
        except Exception as exc:
            raise WorkerBootError(f"--factory: calling {spec}() failed:\n"
                                  f"{_user_traceback(exc)}") from exc
    return _as_asgi3(obj, spec, factory)


def _as_asgi3(obj: Any, spec: str, factory: bool) -> ASGIApp:
    if not callable(obj):
        raise WorkerBootError(f"{spec} is not callable, so it is not an ASGI app")
    if inspect.isclass(obj):
        raise WorkerBootError(
            f"{spec} is a class; give an ASGI application instance (or a factory with --factory)")
    arity = _positional_arity(obj)
    if arity == 3 or arity is None:
        return obj  # type: ignore[no-any-return]
    if arity == 1:
        return _Asgi2(obj)
    if arity == 0 and not factory:
        raise WorkerBootError(f"{spec} takes no arguments: it looks like an app factory; "
                              "add --factory to call it")
    raise WorkerBootError(f"{spec} takes {arity} positional arguments; an ASGI 3 app takes "
                          "(scope, receive, send)")


def _positional_arity(obj: Any) -> int | None:
    """How many positional arguments a call takes; None when unknowable or
    variadic (then it is given the benefit of the doubt)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    count = 0
    for param in sig.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            return None
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and (
                param.default is param.empty):
            count += 1
    return count


class _Asgi2:
    """ASGI 2 ("double callable") app seen as ASGI 3."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        instance = self.app(scope)
        await instance(receive, send)


def _user_traceback(exc: BaseException) -> str:
    """The traceback without importlib's own frames: file and line of the app."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename not in (__file__, importlib.__file__)
              and not f.filename.startswith("<frozen importlib")]
    lines = traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines).rstrip()


class Lifespan:
    """ASGI lifespan: startup before the worker accepts, shutdown after drain.

    An app that raises on the lifespan scope before sending anything does not
    support lifespan; that is fine and logged at debug. A startup.failed is a
    boot error: the worker can never serve.
    """

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.queue: asyncio.Queue[LifespanReceiveEvent] = asyncio.Queue()
        self.events: dict[str, asyncio.Event] = {
            "startup": asyncio.Event(), "shutdown": asyncio.Event()}
        self.failed: str | None = None
        self.supported = True
        self.unsupported_by = ""
        self.task: asyncio.Task[None] | None = None

    async def startup(self, timeout: float, required: bool = False) -> None:
        """Run startup; with `required` (--lifespan on) an app that does not
        speak lifespan is a boot error rather than a debug line."""
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self.queue.put({"type": "lifespan.startup"})
        await self._wait("startup", timeout)
        if self.failed is not None:
            raise WorkerBootError(f"lifespan startup failed: {self.failed}")
        if required and not self.supported:
            raise WorkerBootError(
                f"--lifespan on, but the app does not support lifespan: {self.unsupported_by}")

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
        scope: LifespanScope = {"type": "lifespan",
                                "asgi": {"version": "3.0", "spec_version": "2.0"},
                                "state": self.state}
        started = False

        async def receive() -> LifespanReceiveEvent:
            nonlocal started
            started = True
            return await self.queue.get()

        async def send(message: LifespanSendEvent) -> None:
            kind = message["type"]
            phase = kind.split(".")[1]
            if kind.endswith(".failed"):
                self.failed = str(message.get("message") or "(no message)")
            self.events[phase].set()

        try:
            await self.app(scope, receive, send)
            if not self.events["startup"].is_set():
                self.supported = False
                self.unsupported_by = "the app returned without answering lifespan.startup"
        except Exception as exc:
            if not started:
                self.supported = False
                self.unsupported_by = repr(exc)
                log.debug("lifespan_unsupported", error=repr(exc))
            else:
                self.failed = self.failed or repr(exc)
                log.error("lifespan_error", error=repr(exc), exc_info=True)
        finally:
            for event in self.events.values():
                event.set()
