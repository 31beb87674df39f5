"""HTTP/1.1 over TLS: the asyncio protocol, the ASGI request cycle, responses."""
