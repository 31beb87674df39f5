"""Reports what the scope says about the client, for PROXY protocol and
--no-tls tests: client, scheme, server, whether the TLS extension is there;
a WebSocket at any path sends the same as JSON text, then closes."""

import json


def _facts(scope):
    return {"client": list(scope["client"]) if scope["client"] else None,
            "scheme": scope["scheme"], "server": list(scope["server"] or []),
            "http_version": scope.get("http_version"),
            "tls": "tls" in scope.get("extensions", {})}


async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(_facts(scope)).encode()})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(_facts(scope))})
        await send({"type": "websocket.close", "code": 1000})
