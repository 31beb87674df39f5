"""Logs the way apps do: a `warnings.warn` at import and per request, and
its own stdlib logger ("log_app") at info and warning, for --log-format json
and --log-config tests. GET /?q=... answers 200 with "ok"."""

import logging
import warnings

from lifespan_accept import accept_lifespan

warnings.warn("log_app imported with a deprecated setting", FutureWarning, stacklevel=1)
logger = logging.getLogger("log_app")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await accept_lifespan(receive, send)
        return
    warnings.warn("per-request warning", UserWarning, stacklevel=1)
    logger.info("app info line")
    logger.warning("app warning line")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
