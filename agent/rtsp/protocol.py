"""RTSP 1.0 (RFC 2326) wire format, sans-I/O: a bounded request parser and response builder.

The parser takes bytes as they arrive and yields requests and the client's interleaved
frames (RFC 2326 §10.12, ``$`` + channel + 16-bit length); it never holds more than one
request's worth of bytes. Anything over the limits is a :class:`ParseError` with the status
to answer before closing.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

#: Our Server header: `doctor` tells the agent from another RTSP server on the port by it.
SERVER_NAME = "TheRelay Agent"
MAX_REQUEST_LINE = 4096
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
MAX_BODY = 16 * 1024
_METHOD = re.compile(r"[A-Z][A-Z_]{0,31}")

STATUS_TEXT = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Request Entity Too Large",
    414: "Request-URI Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    451: "Parameter Not Understood", 453: "Not Enough Bandwidth", 454: "Session Not Found",
    455: "Method Not Valid in This State", 459: "Aggregate Operation Not Allowed",
    461: "Unsupported Transport", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable", 505: "RTSP Version Not Supported",
}


@dataclass
class Request:
    method: str
    uri: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    @property
    def cseq(self) -> str | None:
        value = self.headers.get("cseq", "").strip()
        return value if value.isdigit() and len(value) <= 10 else None


@dataclass(frozen=True)
class Interleaved:
    """A frame the client sent on the TCP connection (its RTCP receiver reports)."""

    channel: int
    length: int


@dataclass(frozen=True)
class ParseError:
    status: int
    message: str


Event = Request | Interleaved | ParseError


class Parser:
    """Feed bytes, get events. After a ParseError the connection must be closed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of an interleaved frame still to discard
        self._pending: Request | None = None  # headers parsed, body still coming
        self._failed = False

    @property
    def partial(self) -> bool:
        """A request (or the client's interleaved frame) has begun and not yet ended."""
        return bool(self._buf) or self._pending is not None or self._skip > 0

    def feed(self, data: bytes) -> Iterator[Event]:
        if self._failed:
            return
        self._buf += data
        while self._buf and not self._failed:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                continue
            if self._pending is not None:
                need = int(self._pending.headers["content-length"])
                if len(self._buf) < need:
                    return
                self._pending.body = bytes(self._buf[:need])
                del self._buf[:need]
                request, self._pending = self._pending, None
                yield request
                continue
            if self._buf[0] == 0x24:  # '$': an interleaved frame
                if len(self._buf) < 4:
                    return
                length = int.from_bytes(self._buf[2:4], "big")
                channel = self._buf[1]
                del self._buf[:4]
                self._skip = length  # at most 65535 by construction: discarded as it comes
                yield Interleaved(channel, length)
                continue
            if self._buf[0] in b"\r\n":  # blank lines between requests are tolerated
                del self._buf[:1]
                continue
            event = self._head()
            if event is None:
                return
            if isinstance(event, ParseError):
                self._failed = True
                self._buf.clear()
            if isinstance(event, Request) and "content-length" in event.headers:
                self._pending = event
                continue
            yield event

    def _head(self) -> Event | None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            first = self._buf.find(b"\r\n")
            if first < 0 and len(self._buf) > MAX_REQUEST_LINE:
                return ParseError(414, "request line too long")
            if len(self._buf) > MAX_REQUEST_LINE + MAX_HEADER_BYTES:
                return ParseError(431, "request headers too large")
            if self._buf.count(b"\r\n") > MAX_HEADERS:
                return ParseError(431, "too many request headers")
            return None
        head = bytes(self._buf[:end])
        del self._buf[:end + 4]
        lines = head.split(b"\r\n")
        if len(lines[0]) > MAX_REQUEST_LINE:
            return ParseError(414, "request line too long")
        if len(head) > MAX_REQUEST_LINE + MAX_HEADER_BYTES or len(lines) - 1 > MAX_HEADERS:
            return ParseError(431, "request headers too large")
        try:
            text = [line.decode("utf-8") for line in lines]
        except UnicodeDecodeError:
            return ParseError(400, "request is not UTF-8 text")
        parts = text[0].split(" ")
        if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
            return ParseError(400, "malformed request line")
        method, uri, version = parts
        if version != "RTSP/1.0":
            return ParseError(505, "only RTSP/1.0 is served")
        headers: dict[str, str] = {}
        for line in text[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                return ParseError(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY:
                return ParseError(413, "request body too large")
            if int(length) == 0:
                del headers["content-length"]
        return Request(method, uri, headers)


def response(status: int, cseq: str | None, headers: dict[str, str] | None = None,
             body: bytes = b"") -> bytes:
    lines = [f"RTSP/1.0 {status} {STATUS_TEXT.get(status, 'Error')}"]
    if cseq is not None:
        lines.append(f"CSeq: {cseq}")
    lines.append(f"Server: {SERVER_NAME}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Target:
    """What an RTSP URL names: a camera, optionally one of its tracks, and ?token=."""

    camera: str
    track: str | None
    token: str | None


def parse_url(uri: str) -> Target | None:
    """``rtsp://host:port/<camera>[/trackID=N][?token=…]``; None if it names nothing."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("rtsp", "rtsps") and not uri.startswith("/"):
        return None
    segments = [unquote(s) for s in parts.path.split("/") if s]
    token = parse_qs(parts.query).get("token", [None])[-1]
    if not segments or len(segments) > 2:
        return None
    track = segments[1] if len(segments) == 2 else None
    return Target(segments[0], track, token or None)


def basic_password(headers: dict[str, str]) -> str | None:
    """The password of ``Authorization: Basic`` (the token; any user name), or None."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, sep, password = decoded.partition(":")
    return password if sep and password else None


@dataclass(frozen=True)
class TransportSpec:
    """The client's choice from a SETUP ``Transport`` header (RFC 2326 §12.39)."""

    tcp: bool
    channels: tuple[int, int] | None = None  # interleaved=a-b
    client_ports: tuple[int, int] | None = None  # client_port=a-b
    multicast: bool = False


def parse_transport(header: str) -> TransportSpec | None:
    """The first transport we can serve among those offered, else the reason as None."""
    first_multicast = False
    for option in header.split(","):
        params = [p.strip() for p in option.split(";")]
        spec = params[0].upper()
        if spec not in ("RTP/AVP", "RTP/AVP/UDP", "RTP/AVP/TCP"):
            continue
        values = dict(p.partition("=")[::2] for p in params[1:])
        if "multicast" in values:
            first_multicast = True
            continue
        if spec == "RTP/AVP/TCP":
            chan = _pair(values.get("interleaved", ""))
            return TransportSpec(True, channels=chan)
        ports = _pair(values.get("client_port", ""))
        if ports is not None:
            return TransportSpec(False, client_ports=ports)
    return TransportSpec(False, multicast=True) if first_multicast else None


def _pair(text: str) -> tuple[int, int] | None:
    a, _, b = text.partition("-")
    if not a.isdigit() or len(a) > 5 or (b and (not b.isdigit() or len(b) > 5)):
        return None
    first = int(a)
    second = int(b) if b else first + 1
    if first > 65535 or second > 65535:
        return None
    return first, second
