"""Quart: an HTTP route and a WebSocket route."""

from quart import Quart, websocket

app = Quart(__name__)


@app.route("/")
async def index():
    return "quart says hi"


@app.websocket("/ws")
async def ws():
    while True:
        data = await websocket.receive()
        await websocket.send(f"quart echo {data}")
