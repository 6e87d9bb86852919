"""``OnvifDevice``: a test ONVIF camera that replays captured answers of real camera models.

The answers are XML files under ``tests/data/onvif/<model>/`` (see the README there for where
each one comes from), chosen by the SOAP body's first element — ``GetProfiles.xml``, or
``GetStreamUri@Profile_1.xml`` when the request names a profile token — and templated:

    {{HTTP_HOST}}    host:port of this device as the client addressed it (its XAddrs)
    {{STREAM_HOST}}  host:port of the RTSP camera the stream URIs point at
    {{UTC_*}}        the device's clock (YEAR, MONTH, DAY, HOUR, MINUTE, SECOND), with its offset

WS-Security is checked for real (ONVIF Core §5.12, WS-UsernameToken profile 1.0): every
operation but ``GetSystemDateAndTime`` needs a UsernameToken whose PasswordDigest is
``base64(sha1(nonce + created + password))`` and whose ``Created`` lies within ``max_skew``
seconds of the device's own clock (the host clock plus ``clock_offset``); a nonce is accepted
once. Anything else gets the model's captured ``ter:NotAuthorized`` fault with the model's
HTTP status (``device.json``). Requests are parsed without entity expansion or network access.

In-process (loopback)::

    async with OnvifDevice("hikvision", user="admin", password="pw",
                           stream_host="127.0.0.1:8554") as device:
        await query_device(device.xaddr, "admin", "pw")

As a subprocess (e.g. inside a network namespace), printing ``READY <xaddr>`` when it listens::

    python -m tests.support.onvif_device --model hikvision --host 0.0.0.0 --port 8080 \\
        --user admin --password-file pw.secret --stream-host 10.203.0.1:8554
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web
from lxml import etree  # type: ignore[import-untyped]

DATA = Path(__file__).resolve().parent.parent / "data" / "onvif"
MODELS = tuple(sorted(p.name for p in DATA.iterdir() if (p / "device.json").is_file()))
DEVICE_PATH = "/onvif/device_service"

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
PASSWORD_DIGEST = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
    "#PasswordDigest"
)
# ONVIF Core §5.9.4.2: operations in the PRE_AUTH class need no credentials.
PRE_AUTH = frozenset({"GetSystemDateAndTime"})

# A "billion laughs" answer for the hostile-device test: ten levels of ten references.
ENTITY_BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']>\n<s:Envelope xmlns:s="' + SOAP12.encode() + b'"><s:Body>&lol9;</s:Body></s:Envelope>\n'
)

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclass(frozen=True)
class SeenRequest:
    """One SOAP request as the device saw it."""

    path: str
    operation: str
    username: str | None
    authorized: bool
    reason: str  # "ok", "pre-auth", "no token", "wrong digest", "stale created", "replayed nonce"
    profile_token: str | None = None  # the request's ProfileToken, if it names one


class OnvifDevice:
    """One fake camera of a captured ``model``; ``start()``/``stop()`` or ``async with``."""

    def __init__(
        self,
        model: str,
        *,
        user: str = "admin",
        password: str = "",
        stream_host: str = "127.0.0.1:554",
        host: str = "127.0.0.1",
        port: int = 0,
        clock_offset: float = 0.0,
        max_skew: float = 60.0,
        hostile: bool = False,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r} (have {', '.join(MODELS)})")
        self.model = model
        self.user = user
        self.password = password
        self.stream_host = stream_host
        self.host = host
        self.port = port
        self.clock_offset = clock_offset
        self.max_skew = max_skew
        self.hostile = hostile
        self.requests: list[SeenRequest] = []
        self._dir = DATA / model
        self._meta = json.loads((self._dir / "device.json").read_text())
        self._files = {p.stem: p.read_text() for p in self._dir.glob("*.xml")}
        self._nonces: set[bytes] = set()
        self._runner: web.AppRunner | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def xaddr(self) -> str:
        """The device service URL (valid after ``start``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{DEVICE_PATH}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def operations(self) -> list[str]:
        return [r.operation for r in self.requests]

    # -- the device -----------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """The device's clock: the host's, off by ``clock_offset`` seconds."""
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.clock_offset)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hostile:
            return web.Response(body=ENTITY_BOMB, content_type="application/soap+xml")
        try:
            envelope = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError:
            return self._fault("ActionNotSupported", self._meta["action_fault_status"], request)
        soap_body = envelope.find(f"{{{SOAP12}}}Body")
        if soap_body is None or len(soap_body) == 0:
            return self._fault("ActionNotSupported", self._meta["action_fault_status"], request)
        operation = etree.QName(soap_body[0]).localname
        username, authorized, reason = self._check_security(envelope, operation)
        token = soap_body[0].findtext("{*}ProfileToken")
        self.requests.append(SeenRequest(request.path, operation, username, authorized, reason,
                                         token))
        if not authorized:
            return self._fault("NotAuthorized", self._meta["auth_fault_status"], request)
        name = f"{operation}@{token}" if f"{operation}@{token}" in self._files else operation
        template = self._files.get(name)
        if template is None:
            return self._fault("ActionNotSupported", self._meta["action_fault_status"], request)
        return self._reply(template, 200, request)

    def _check_security(
        self, envelope: etree._Element, operation: str
    ) -> tuple[str | None, bool, str]:
        token = envelope.find(f"{{{SOAP12}}}Header/{{{WSSE}}}Security/{{{WSSE}}}UsernameToken")
        username = token.findtext(f"{{{WSSE}}}Username") if token is not None else None
        if operation in PRE_AUTH:
            return username, True, "pre-auth"
        if token is None:
            return None, False, "no token"
        password = token.find(f"{{{WSSE}}}Password")
        nonce_text = token.findtext(f"{{{WSSE}}}Nonce") or ""
        created = token.findtext(f"{{{WSU}}}Created") or ""
        if password is None or password.get("Type") != PASSWORD_DIGEST:
            return username, False, "no digest"
        try:
            nonce = base64.b64decode(nonce_text, validate=True)
        except ValueError:
            return username, False, "bad nonce"
        expected = base64.b64encode(
            hashlib.sha1(nonce + created.encode() + self.password.encode()).digest()
        ).decode()
        if username != self.user or not hmac.compare_digest(expected, password.text or ""):
            return username, False, "wrong digest"
        try:
            when = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            return username, False, "bad created"
        if when.tzinfo is None or abs((when - self.now()).total_seconds()) > self.max_skew:
            return username, False, "stale created"
        if nonce in self._nonces:
            return username, False, "replayed nonce"
        self._nonces.add(nonce)
        return username, True, "ok"

    def _fault(self, subcode: str, status: int, request: web.Request) -> web.Response:
        return self._reply(self._files[f"Fault-{subcode}"], status, request)

    def _reply(self, template: str, status: int, request: web.Request) -> web.Response:
        now = self.now()
        values = {
            "HTTP_HOST": request.host,
            "STREAM_HOST": self.stream_host,
            "UTC_YEAR": str(now.year), "UTC_MONTH": str(now.month), "UTC_DAY": str(now.day),
            "UTC_HOUR": str(now.hour), "UTC_MINUTE": str(now.minute),
            "UTC_SECOND": str(now.second),
        }  # fmt: skip
        text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
        return web.Response(
            status=status, body=text.encode(), content_type="application/soap+xml",
            charset="utf-8",
        )


async def _serve(args: argparse.Namespace) -> None:
    password = Path(args.password_file).read_text().rstrip("\n") if args.password_file else ""
    device = OnvifDevice(
        args.model, user=args.user, password=password, stream_host=args.stream_host,
        host=args.host, port=args.port, clock_offset=args.clock_offset,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with device:
        print(f"READY {device.xaddr}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A test ONVIF device replaying captures.")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file")
    parser.add_argument("--stream-host", required=True, help="host:port of the RTSP camera")
    parser.add_argument("--clock-offset", type=float, default=0.0, help="seconds")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
