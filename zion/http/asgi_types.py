"""The ASGI messages and scope of an HTTP exchange, as types (ASGI 3.0,
HTTP spec 2.4 and its trailers / pathsend extensions). TypedDicts are plain
dicts at run time: this costs the request path nothing and lets mypy check
every scope and message zion builds. What an app sends is checked by the
exchange at run time, whatever its type says.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NotRequired, TypedDict

Header = tuple[bytes, bytes]


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
    extensions: dict[str, dict[str, Any]]


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
    extensions: dict[str, dict[str, Any]]


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
