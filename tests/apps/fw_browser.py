"""A page whose script opens wss:// back to its origin and round-trips a
message, for a headless browser."""

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

PAGE = """<!doctype html><html><head><title>waiting</title></head><body>
<p id="out">waiting</p>
<script>
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onopen = () => ws.send("ping from the browser");
ws.onmessage = (e) => { document.getElementById("out").textContent = "got:" + e.data;
                        document.title = "done"; };
ws.onerror = () => { document.getElementById("out").textContent = "ws error"; };
</script></body></html>"""


async def page(request):
    return HTMLResponse(PAGE)


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    # Which HTTP the WebSocket came over: "2" is RFC 8441, a stream of the
    # page's own HTTP/2 connection.
    await websocket.send_text(f"echo:{text} (HTTP/{websocket.scope['http_version']})")


app = Starlette(routes=[Route("/", page), WebSocketRoute("/ws", echo)])
