"""File responses: Starlette's FileResponse (which sends http.response.pathsend
when the server advertises it) and raw ASGI pathsend messages, good and bad.
Files come from $ZION_TEST_DATA."""

import os
import pathlib

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

DATA = pathlib.Path(os.environ.get("ZION_TEST_DATA", "/nonexistent"))


async def file(request):
    return FileResponse(DATA / request.path_params["name"])


async def extensions(request):
    from starlette.responses import JSONResponse

    return JSONResponse(sorted(request.scope.get("extensions", {})))


starlette_app = Starlette(routes=[Route("/file/{name}", file),
                                  Route("/extensions", extensions)])

# What the raw app sends as the path for /raw/<case>.
_PATHS = {"relative": "data/one.bin", "missing": "/nonexistent/file.bin",
          "directory": "/", "one": None,
          # sysfs: a regular file whose st_size (4096) is more than it holds.
          "short": "/sys/devices/system/cpu/online"}


async def app(scope, receive, send):
    if scope["type"] != "http" or not scope["path"].startswith("/raw/"):
        await starlette_app(scope, receive, send)
        return
    case = scope["path"][5:]
    path = _PATHS.get(case, str(DATA / "one.bin"))
    headers = [(b"content-type", b"application/octet-stream")]
    if case == "wrong-length":
        headers.append((b"content-length", b"7"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.pathsend", "path": path or str(DATA / "one.bin")})
