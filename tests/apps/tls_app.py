"""Reports what the ASGI TLS extension says about the client certificate."""

import json


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    tls = scope.get("extensions", {}).get("tls")
    body = json.dumps({"name": tls and tls["client_cert_name"],
                       "chain": len(tls["client_cert_chain"]) if tls else None,
                       "version": tls and tls["tls_version"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"server", b"app/1.0")]})
    await send({"type": "http.response.body", "body": body})
