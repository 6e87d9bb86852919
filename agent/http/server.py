"""aiohttp application and runner. Handlers never decide access alone: they call ``authorize``."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

#: Request bodies beyond this are refused with 413 (SDP offers are a few kB).
MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# WHEP clients on other origins (a web page elsewhere on the LAN) use these. Tokens travel in
# Authorization headers, never cookies, so any origin may call (no credentials mode).
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, Link, ETag, Accept-Patch, WWW-Authenticate, "
                                     "Retry-After",
}
_PREFLIGHT = {
    **_CORS,
    "Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Max-Age": "600",
}


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=_PREFLIGHT)
    response = await handler(request)
    response.headers.update(_CORS)
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON with a stable code, never a traceback. Client mistakes that aiohttp
    raises (404, 405, 413…) keep their 4xx status; a bug in a handler is logged with its
    traceback and answered 500 ``internal`` with no detail."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = exc.reason.lower().replace(" ", "_")
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return web.json_response({"error": code, "message": exc.reason}, status=exc.status,
                                 headers=headers)
    except Exception:
        log.exception("http_handler_failed", path=request.path)
        return web.json_response(
            {"error": "internal", "message": "the agent hit an internal error; see its log"},
            status=500,
        )


def make_app(health: Callable[[], dict[str, object]]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_cors, _errors])

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(health())

    app.router.add_get("/healthz", healthz)
    return app


async def start(app: web.Application, host: str, port: int,
                ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Listen on host:port; with ``ssl_context``, HTTPS only (nothing is served in clear)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
