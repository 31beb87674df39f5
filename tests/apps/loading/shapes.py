"""Callables of every shape `zion serve` may be pointed at (app loading tests)."""


async def asgi3(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"asgi3"})


def factory():
    return asgi3


def asgi2(scope):
    async def instance(receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi2"})
    return instance


def wsgi_like(environ, start_response):
    return [b"no"]


not_callable = 42


class AppClass:
    async def __call__(self, scope, receive, send):
        pass
