"""Connection limits for the HTTP server: counts per address, a header deadline, and quiet
accept errors.

aiohttp accepts every connection and keeps it until its keep-alive timer (75 s by default)
fires. Here a connection over ``max_connections`` overall or ``max_per_ip`` from one address
is aborted as soon as it is accepted — before any parser, task or buffer exists for it — and
the keep-alive timer, which aiohttp starts at accept time and which only a complete request
resets, is the header deadline. Bodies are read under the same deadline (``read_body``).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = structlog.get_logger(__name__)

#: A burst of refusals or accept errors ends after this many quiet seconds; one log line
#: opens a burst, one closes it with the count.
BURST_GAP = 10.0
#: Seconds a request body (64 KiB at most) may take to arrive.
BODY_TIMEOUT = 10.0


class ConnectionLimits(NamedTuple):
    max_total: int
    max_per_ip: int
    header_timeout: float


class Burst:
    """Log the first event of a burst, count the rest, report the count when it is over."""

    def __init__(self, event: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._event = event
        self._clock = clock
        self._last = -BURST_GAP
        self.count = 0

    def hit(self, **fields: Any) -> None:
        now = self._clock()
        if now - self._last >= BURST_GAP:
            if self.count > 1:
                log.warning(f"{self._event}_burst_over", more=self.count - 1)
            self.count = 0
            log.warning(self._event, **fields)
        self.count += 1
        self._last = now


class _Gate(asyncio.Protocol):
    """The protocol a new connection gets first: it asks the server for a real handler and
    hands the transport over, or aborts the connection without reading a byte."""

    def __init__(self, server: LimitedServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self._server.admit(transport)
        if handler is None:
            transport.abort()  # type: ignore[attr-defined]
            return
        transport.set_protocol(handler)
        handler.connection_made(transport)


class LimitedServer(Server):
    """aiohttp's protocol factory, counting connections per peer address."""

    def __init__(self, plain: Server, limits: ConnectionLimits) -> None:
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation,
                         loop=plain._loop, **plain._kwargs)
        self.limits = limits
        self._per_ip: Counter[str] = Counter()
        self._ip_of: dict[RequestHandler, str] = {}
        self.refused = 0
        self._refusals = Burst("http_connections_refused")

    def __call__(self) -> RequestHandler:
        # asyncio only needs a protocol; aiohttp's type says RequestHandler
        return _Gate(self)  # type: ignore[return-value]

    def admit(self, transport: asyncio.BaseTransport) -> RequestHandler | None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        over = ("overall" if len(self._ip_of) >= self.limits.max_total
                else "per_ip" if self._per_ip[ip] >= self.limits.max_per_ip else None)
        if over is not None:
            self.refused += 1
            self._refusals.hit(cap=over, peer_ip=ip, open=len(self._ip_of),
                               fix="see http.max_connections and http.max_connections_per_ip")
            return None
        handler = super().__call__()
        self._per_ip[ip] += 1
        self._ip_of[handler] = ip
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        ip = self._ip_of.pop(handler, None)
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]


class LimitedRunner(web.AppRunner):
    """An AppRunner whose server is a ``LimitedServer``; the keep-alive timeout is the header
    deadline (aiohttp starts it at accept and only a complete request resets it)."""

    def __init__(self, app: web.Application, limits: ConnectionLimits) -> None:
        super().__init__(app, access_log=None, keepalive_timeout=limits.header_timeout)
        self._limits = limits

    async def _make_server(self) -> Server:
        return LimitedServer(await super()._make_server(), self._limits)


async def read_body(request: web.Request, timeout: float = BODY_TIMEOUT) -> bytes:
    """The request body, within ``timeout`` seconds (a client trickling a body byte by byte
    would hold its connection otherwise): 408 past it."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="Request Timeout") from None


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs every failed accept() (EMFILE at the open-files limit: 167k lines in 34 s
    once); log the first of a burst and its count instead."""
    burst = Burst("http_accept_failing")
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            exc = context.get("exception")
            burst.hit(error=str(exc) if exc else message,
                      fix="raise LimitNOFILE or lower http.max_connections / sessions.*")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def raise_open_files() -> int:
    """Raise this process's soft open-files limit to its hard limit; returns the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard
