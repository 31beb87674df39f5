"""The lifespan protocol, accepted: what the bare ASGI test apps do with it."""


async def accept_lifespan(receive, send) -> None:
    """Answer startup and shutdown, return after shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
