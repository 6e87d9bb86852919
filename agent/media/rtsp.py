"""A small RTSP client: OPTIONS and DESCRIBE, Basic and Digest auth, the SDP (for doctor, and
for the question every camera open asks first: agent/media/sources/rtsp_login.py).

It never sends SETUP or PLAY, so asking a camera costs it one short TCP connection and
never disturbs the agent's own pull (RFC 2326 §10.2: DESCRIBE only describes). The parsing
half (requests, responses, challenges, SDP) is plain functions without I/O; ``describe``
moves the bytes with asyncio streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import secrets
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from agent import __version__

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322}  # RFC 2326 §3.2; rtsps: IANA port 322
MAX_HEADER = 16 * 1024
MAX_BODY = 256 * 1024  # an SDP is a few hundred bytes; anything bigger is not a camera


class RtspProtocolError(ValueError):
    """The peer did not answer in RTSP (another service on the port, or garbage)."""


# -- URLs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where to connect and what to ask, with the credentials kept apart from the URL."""

    scheme: str
    host: str
    port: int
    url: str  # the request URL, without user information
    username: str | None
    password: str | None


def target(url: str, username: str | None = None, password: str | None = None) -> Target:
    """Split ``url``; ``username``/``password`` given apart win over those in the URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"not an RTSP URL: {scheme}://")
    host = parts.hostname or ""
    if not host:
        raise ValueError("the URL has no host")
    port = parts.port or DEFAULT_PORTS[scheme]
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    clean = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    if username:
        return Target(scheme, host, port, clean, username, password or "")
    user = unquote(parts.username) if parts.username else None
    secret = unquote(parts.password) if parts.password is not None else None
    return Target(scheme, host, port, clean, user, secret if user else None)


# -- messages -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def request(method: str, url: str, cseq: int, headers: dict[str, str] | None = None, *,
            agent: str = "therelay-agent-doctor") -> bytes:
    """One RTSP/1.0 request without a body (RFC 2326 §6)."""
    lines = [f"{method} {url} RTSP/1.0", f"CSeq: {cseq}", f"User-Agent: {agent}/{__version__}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(data: bytes) -> Response:
    """The status line and headers (up to the blank line) of a response."""
    text = data.decode("utf-8", "replace")
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    match = re.fullmatch(r"RTSP/\d\.\d (\d{3})(?: (.*))?", lines[0].strip())
    if match is None:
        raise RtspProtocolError(f"not an RTSP answer: {lines[0][:60]!r}")
    response = Response(int(match.group(1)), (match.group(2) or "").strip())
    for line in lines[1:]:
        if not line.strip():
            continue
        if line[0] in " \t" and response.headers:  # folded continuation line
            key, value = response.headers[-1]
            response.headers[-1] = (key, f"{value} {line.strip()}")
            continue
        key, sep, value = line.partition(":")
        if sep:
            response.headers.append((key.strip(), value.strip()))
    return response


# -- authentication (RFC 2617, RFC 7616; RTSP uses them as HTTP does, RFC 2326 §D.2) -------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: basic | digest | …
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(header: str) -> Challenge:
    """One ``WWW-Authenticate`` value: a scheme and its auth-params (quoted or not)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(rest):
        quoted = raw.startswith('"')
        params[key.lower()] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if quoted else raw
    return Challenge(scheme.lower(), params)


def basic_authorization(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


_HASHES = {"md5": hashlib.md5, "sha-256": hashlib.sha256}


def digest_authorization(challenge: Challenge, method: str, uri: str, username: str,
                         password: str, *, nc: int = 1, cnonce: str | None = None) -> str:
    """The ``Authorization: Digest …`` answer to ``challenge`` (RFC 7616 §3.4).

    MD5 and SHA-256 (and their ``-sess`` forms); with ``qop=auth`` when offered, else the
    RFC 2069 form most cameras still use. Raises ValueError for what it cannot answer.
    """
    p = challenge.params
    realm, nonce = p.get("realm", ""), p.get("nonce")
    if nonce is None:
        raise ValueError("the Digest challenge has no nonce")
    algorithm = p.get("algorithm", "MD5")
    base = algorithm.lower().removesuffix("-sess")
    if base not in _HASHES:
        raise ValueError(f"unsupported Digest algorithm {algorithm}")

    def h(text: str) -> str:
        # Digest hashes are a protocol requirement here, not a choice of password storage.
        return _HASHES[base](text.encode()).hexdigest()

    qops = [q.strip() for q in p.get("qop", "").split(",") if q.strip()]
    if qops and "auth" not in qops:
        raise ValueError(f"unsupported Digest qop {p['qop']}")
    cnonce = cnonce or secrets.token_hex(8)
    ha1 = h(f"{username}:{realm}:{password}")
    if algorithm.lower().endswith("-sess"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    ha2 = h(f"{method}:{uri}")
    fields = [f'username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    if qops:
        count = f"{nc:08x}"
        response = h(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}")
        fields += [f'response="{response}"', "qop=auth", f"nc={count}", f'cnonce="{cnonce}"']
    else:
        fields.append(f'response="{h(f"{ha1}:{nonce}:{ha2}")}"')
    if "algorithm" in p:
        fields.append(f"algorithm={algorithm}")
    if "opaque" in p:
        fields.append(f'opaque="{p["opaque"]}"')
    return "Digest " + ", ".join(fields)


def authorization(challenges: list[Challenge], method: str, uri: str, username: str,
                  password: str, *, basic: bool = True) -> str | None:
    """The strongest answer we can give: Digest when offered, else Basic (unless ``basic``
    is False: the password never goes in clear then); None if neither."""
    for challenge in challenges:
        if challenge.scheme == "digest":
            try:
                return digest_authorization(challenge, method, uri, username, password)
            except ValueError:
                continue
    if basic and any(c.scheme == "basic" for c in challenges):
        return basic_authorization(username, password)
    return None


# -- SDP (RFC 8866) -----------------------------------------------------------------------

#: RFC 3551 static payload types for video that need no rtpmap line.
_STATIC_VIDEO = {26: "mjpeg", 31: "h261", 32: "mpeg1video", 34: "h263"}
#: RTP encoding names → FFmpeg codec names, as the agent reports codecs.
_ENCODINGS = {"h264": "h264", "h265": "hevc", "hevc": "hevc", "jpeg": "mjpeg",
              "mp4v-es": "mpeg4", "vp8": "vp8", "vp9": "vp9", "av1": "av1"}


@dataclass(frozen=True)
class SdpMedia:
    kind: str  # video | audio | application …
    codec: str | None  # FFmpeg-style name (h264, hevc, pcm_mulaw …) or the RTP name


def sdp_media(sdp: str) -> list[SdpMedia]:
    """Each ``m=`` section's kind and the codec of its first payload type."""
    sections: list[tuple[str, list[str], dict[str, str]]] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            parts = line[2:].split()
            sections.append((parts[0].lower() if parts else "", parts[3:], {}))
        elif line.startswith("a=rtpmap:") and sections:
            pt, _, encoding = line[len("a=rtpmap:"):].partition(" ")
            sections[-1][2][pt.strip()] = encoding.split("/")[0].strip().lower()
    out = []
    for kind, payloads, rtpmap in sections:
        codec = None
        if payloads:
            first = payloads[0]
            if first in rtpmap:
                codec = _ENCODINGS.get(rtpmap[first], _audio_name(rtpmap[first]))
            elif first.isdigit() and kind == "video":
                codec = _STATIC_VIDEO.get(int(first))
            elif first.isdigit() and kind == "audio":
                codec = {0: "pcm_mulaw", 8: "pcm_alaw"}.get(int(first))
        out.append(SdpMedia(kind, codec))
    return out


def _audio_name(encoding: str) -> str:
    return {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw", "mpeg4-generic": "aac",
            "mp4a-latm": "aac", "opus": "opus"}.get(encoding, encoding)


def video_codec(sdp: str) -> str | None:
    """The codec of the first video section, or None when the SDP has no video."""
    return next((m.codec or "unknown" for m in sdp_media(sdp) if m.kind == "video"), None)


# -- I/O ----------------------------------------------------------------------------------


class Connection:
    """One RTSP connection: send a request, read its response (one at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._cseq = 0

    @classmethod
    async def open(cls, t: Target, address: str | None = None) -> Connection:
        context = None
        if t.scheme == "rtsps":
            # FFmpeg, which the agent pulls with, does not verify camera certificates by
            # default (cameras ship self-signed ones): diagnose what the agent would see.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            address or t.host, t.port, ssl=context,
            server_hostname=t.host if context is not None else None)
        return cls(reader, writer)

    async def ask(self, method: str, url: str, headers: dict[str, str] | None = None) -> Response:
        self._cseq += 1
        self._writer.write(request(method, url, self._cseq, headers))
        await self._writer.drain()
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise RtspProtocolError("response headers too long") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ConnectionResetError("the camera closed the connection") from None
            raise RtspProtocolError("the answer ended early") from None
        if len(head) > MAX_HEADER:
            raise RtspProtocolError("response headers too long")
        response = parse_head(head)
        length = int(response.header("Content-Length") or 0)
        if length > MAX_BODY:
            raise RtspProtocolError(f"a {length}-byte body is not an SDP")
        if length:
            response.body = await self._reader.readexactly(length)
        return response

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):  # the camera reset it first: nothing to release
            await self._writer.wait_closed()


@dataclass
class Description:
    """What DESCRIBE found: the final response, and whether credentials were sent."""

    response: Response
    sent_credentials: bool
    auth_scheme: str | None  # basic | digest when credentials were sent
    challenges: list[Challenge]

    @property
    def sdp(self) -> str:
        return self.response.body.decode("utf-8", "replace")


async def describe(conn: Connection, t: Target, address: str | None = None, *,
                   basic: bool = True) -> Description:
    """OPTIONS, then DESCRIBE; once more with credentials when the camera asks for them.

    Takes ownership of ``conn`` (closed on return). A camera that closed the connection
    after its 401 is asked again on a new one, to ``address`` (where the first went).
    """
    try:
        await conn.ask("OPTIONS", t.url)  # some cameras want it first (FFmpeg sends it too)
        headers = {"Accept": "application/sdp"}
        first = await conn.ask("DESCRIBE", t.url, headers)
        challenges = [parse_challenge(v) for v in first.all("WWW-Authenticate")]
        if first.status != 401 or t.username is None:
            return Description(first, False, None, challenges)
        answer = authorization(challenges, "DESCRIBE", t.url, t.username, t.password or "",
                               basic=basic)
        if answer is None:
            return Description(first, False, None, challenges)
        headers["Authorization"] = answer
        try:
            second = await conn.ask("DESCRIBE", t.url, headers)
        except ConnectionError:
            # Many cameras hang up after a 401; FFmpeg reconnects for the retry as well.
            await conn.close()
            conn = await Connection.open(t, address)
            second = await conn.ask("DESCRIBE", t.url, headers)
        return Description(second, True, answer.split(" ", 1)[0].lower(), challenges)
    finally:
        await conn.close()
