"""A request's Task, started with its first step run at once, as Python
3.12's `asyncio.Task(coro, eager_start=True)` does; on 3.11 too.

Why: on a new TLS 1.3 connection OpenSSL writes the session tickets
(NewSessionTicket, RFC 8446 4.6.1) into the SSL object's outgoing buffer
once the client's Finished arrives, and uvloop's SSL layer sends that buffer
at the end of the read that delivers the first request (sslproto.pyx:
_do_read -> data_received, then _process_outgoing, which writes at once).
A Task started the usual way runs one loop turn later, so the tickets left
in a write(2) and a TCP segment of their own, and the response in the next:
4 writes a connection (handshake, tickets, response, close_notify) where a
server answering inside data_received makes 3, each one more segment that
wakes the client. Run eagerly, an app that answers without waiting (most
do) writes its response before data_received returns: tickets and response
leave together. A keep-alive request saves a trip through the loop's ready
queue as well.

How, on 3.11: the C Task schedules its first step while it is constructed,
through `loop.call_soon(step, context=ctx)`, looked up on the loop object
(Modules/_asynciomodule.c, task_call_step_soon). For that construction only,
an instance attribute shadows the loop's call_soon (uvloop.Loop and
asyncio's loops are Python classes with a __dict__): it keeps the step
scheduled with this Task's own context and passes any other call on. The
step then runs at once in that context. It is the Task's own step: it makes
the Task asyncio.current_task() (anyio and sniffio read it), runs the
coroutine to its first suspension, and schedules the rest as every Task
does. The app sees what 3.12's eager start gives it: its own Task, its own
copy of the context; only its first step runs before the caller goes on.
Started from inside another Task, or on a loop without a __dict__, the
Task starts on the next loop turn, as create_task's do.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EAGER_NATIVE = sys.version_info >= (3, 12)


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A Task running `coro` on `loop`, its first step already run."""
    if EAGER_NATIVE:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    namespace = getattr(loop, "__dict__", None)
    if namespace is None or asyncio.current_task(loop) is not None:
        # A step cannot run inside another Task's (3.11 refuses to enter a
        # Task while one runs): this one starts on the next loop turn.
        return loop.create_task(coro)
    own = contextvars.copy_context()
    caught: list[Callable[[], object]] = []
    real = loop.call_soon

    def call_soon(callback: Callable[..., object], *args: Any,
                  context: contextvars.Context | None = None) -> Any:
        if context is own and not caught and not args:
            caught.append(callback)
            return None  # the Task drops the handle call_soon returns
        return real(callback, *args, context=context)

    namespace["call_soon"] = call_soon
    try:
        task = asyncio.Task(coro, loop=loop, context=own)
    finally:
        namespace.pop("call_soon", None)
    if caught:
        own.run(caught[0])
    return task
