"""The ASGI scopes and messages, as types (ASGI 3.0: HTTP spec 2.4 and its
trailers / pathsend extensions, WebSocket 2.4, lifespan 2.0), and the
application that takes them. TypedDicts are plain dicts at run time: this
costs the request path nothing and lets mypy check every scope and message
zion builds. What an app sends is checked by the exchange at run time,
whatever its type says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, NotRequired, TypedDict

Header = tuple[bytes, bytes]
# scope["extensions"]: each extension the server supports, by name, with its
# parameters ({} for most; "tls" has the connection's).
Extensions = dict[str, dict[str, Any]]


class ASGIVersions(TypedDict):
    version: str
    spec_version: str


class HTTPScope(TypedDict):
    type: Literal["http"]
    asgi: ASGIVersions
    http_version: str  # "1.0", "1.1", "2", "3"
    server: tuple[str, int] | None
    client: tuple[str, int] | None
    scheme: str
    method: str
    root_path: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[Header]
    state: dict[str, Any]
    extensions: Extensions


# -- receive -------------------------------------------------------------------

class HTTPRequestEvent(TypedDict):
    type: Literal["http.request"]
    body: bytes
    more_body: bool


class HTTPDisconnectEvent(TypedDict):
    type: Literal["http.disconnect"]


HTTPReceiveEvent = HTTPRequestEvent | HTTPDisconnectEvent


# -- send ------------------------------------------------------------------------

class HTTPResponseStartEvent(TypedDict):
    type: Literal["http.response.start"]
    status: int
    headers: NotRequired[Iterable[Header]]
    trailers: NotRequired[bool]


class HTTPResponseBodyEvent(TypedDict):
    type: Literal["http.response.body"]
    body: NotRequired[bytes]
    more_body: NotRequired[bool]


class HTTPResponseTrailersEvent(TypedDict):
    type: Literal["http.response.trailers"]
    headers: NotRequired[Iterable[Header]]
    more_trailers: NotRequired[bool]


class HTTPResponsePathsendEvent(TypedDict):
    type: Literal["http.response.pathsend"]
    path: str


HTTPSendEvent = (HTTPResponseStartEvent | HTTPResponseBodyEvent | HTTPResponseTrailersEvent
                 | HTTPResponsePathsendEvent)


# -- WebSocket (ASGI WebSocket spec 2.4 and its websocket.http.response extension)

class WebSocketScope(TypedDict):
    type: Literal["websocket"]
    asgi: ASGIVersions
    http_version: str
    scheme: str  # "ws" or "wss"
    server: tuple[str, int] | None
    client: tuple[str, int] | None
    root_path: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[Header]
    subprotocols: list[str]
    state: dict[str, Any]
    extensions: Extensions


class WebSocketConnectEvent(TypedDict):
    type: Literal["websocket.connect"]


# A message has `bytes` or `text`; the spec lets the other key be absent or None.
class WebSocketReceiveBytesEvent(TypedDict):
    type: Literal["websocket.receive"]
    bytes: bytes
    text: NotRequired[None]


class WebSocketReceiveTextEvent(TypedDict):
    type: Literal["websocket.receive"]
    bytes: NotRequired[None]
    text: str


class WebSocketDisconnectEvent(TypedDict):
    type: Literal["websocket.disconnect"]
    code: int
    reason: NotRequired[str | None]


WebSocketReceiveEvent = WebSocketReceiveBytesEvent | WebSocketReceiveTextEvent
# What receive() gives a WebSocket app.
WebSocketEvent = WebSocketConnectEvent | WebSocketReceiveEvent | WebSocketDisconnectEvent


class WebSocketAcceptEvent(TypedDict):
    type: Literal["websocket.accept"]
    subprotocol: NotRequired[str | None]
    headers: NotRequired[Iterable[Header]]


class WebSocketSendBytesEvent(TypedDict):
    type: Literal["websocket.send"]
    bytes: bytes
    text: NotRequired[None]


class WebSocketSendTextEvent(TypedDict):
    type: Literal["websocket.send"]
    bytes: NotRequired[None]
    text: str


class WebSocketCloseEvent(TypedDict):
    type: Literal["websocket.close"]
    code: NotRequired[int]
    reason: NotRequired[str | None]


class WebSocketResponseStartEvent(TypedDict):
    """websocket.http.response: an HTTP answer instead of the upgrade."""

    type: Literal["websocket.http.response.start"]
    status: int
    headers: NotRequired[Iterable[Header]]


class WebSocketResponseBodyEvent(TypedDict):
    type: Literal["websocket.http.response.body"]
    body: NotRequired[bytes]
    more_body: NotRequired[bool]


WebSocketSendEvent = WebSocketSendBytesEvent | WebSocketSendTextEvent
# What a WebSocket app may send().
WebSocketSendMessage = (WebSocketAcceptEvent | WebSocketSendEvent | WebSocketCloseEvent
                        | WebSocketResponseStartEvent | WebSocketResponseBodyEvent)


# -- lifespan (ASGI lifespan spec 2.0) ---------------------------------------------

class LifespanScope(TypedDict):
    type: Literal["lifespan"]
    asgi: ASGIVersions
    state: dict[str, Any]


class LifespanStartupEvent(TypedDict):
    type: Literal["lifespan.startup"]


class LifespanShutdownEvent(TypedDict):
    type: Literal["lifespan.shutdown"]


LifespanReceiveEvent = LifespanStartupEvent | LifespanShutdownEvent


class LifespanStartupCompleteEvent(TypedDict):
    type: Literal["lifespan.startup.complete"]


class LifespanStartupFailedEvent(TypedDict):
    type: Literal["lifespan.startup.failed"]
    message: NotRequired[str]


class LifespanShutdownCompleteEvent(TypedDict):
    type: Literal["lifespan.shutdown.complete"]


class LifespanShutdownFailedEvent(TypedDict):
    type: Literal["lifespan.shutdown.failed"]
    message: NotRequired[str]


LifespanSendEvent = (LifespanStartupCompleteEvent | LifespanStartupFailedEvent
                     | LifespanShutdownCompleteEvent | LifespanShutdownFailedEvent)


# -- the application -----------------------------------------------------------------

Scope = HTTPScope | WebSocketScope | LifespanScope
ReceiveEvent = HTTPReceiveEvent | WebSocketEvent | LifespanReceiveEvent
SendEvent = HTTPSendEvent | WebSocketSendMessage | LifespanSendEvent
ASGIReceiveCallable = Callable[[], Awaitable[ReceiveEvent]]
# Each protocol's send() takes its own messages (Exchange.send an HTTPSendEvent,
# WebSocketProtocol.send a WebSocketSendMessage) and checks what an app gives it
# at run time. A callable typed to take every SendEvent would be none of them
# (a parameter type is contravariant), so the message is Any here.
ASGISendCallable = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
