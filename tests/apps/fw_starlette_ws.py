"""Starlette WebSockets: subprotocol negotiation, a close before accept
(403) and a denial response (websocket.http.response)."""

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket


async def chat(websocket: WebSocket) -> None:
    offered = websocket.scope["subprotocols"]
    await websocket.accept(subprotocol="chat.v2" if "chat.v2" in offered else None)
    await websocket.send_text(f"subprotocol={websocket.scope['subprotocols']}")
    await websocket.close()


async def refuse(websocket: WebSocket) -> None:
    await websocket.close(code=1008)


async def deny(websocket: WebSocket) -> None:
    await websocket.send_denial_response(
        PlainTextResponse("members only", status_code=401, headers={"x-why": "no token"}))


app = Starlette(routes=[WebSocketRoute("/chat", chat), WebSocketRoute("/refuse", refuse),
                        WebSocketRoute("/deny", deny)])
