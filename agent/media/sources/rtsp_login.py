"""Before FFmpeg gets a camera's password: ask the camera how it wants it, and decide.

FFmpeg answers whatever ``WWW-Authenticate`` challenge it receives once credentials are in
the URL, Basic included — the password in clear to whoever answers at that address. It has
no option to refuse Basic. So every open of an RTSP camera first asks, on a connection of
its own, OPTIONS and DESCRIBE *without* credentials (RFC 2326 §10.1, §10.2: nothing is
set up) and reads the challenge; FFmpeg then gets the credentials only when the rule allows
the scheme the camera asked for:

``auto``    Digest, or Basic for a camera that never asked for Digest; a camera that asked
            for Digest before and now asks only for Basic is refused (a downgrade).
``digest``  only Digest (adopted cameras that moved, unless Basic was allowed for them).
``basic``   Basic is allowed even after Digest (the installer said so).

FFmpeg prefers Digest when a camera offers both (libavformat/httpauth.c takes the strongest
scheme), so "the challenge offers Digest" is enough to hand the URL over. What this cannot
close: a peer that answers this question with Digest and FFmpeg's own connection, a moment
later, with Basic. Such a peer must already hold the camera's address (the discovery rules
keep announcements from moving a camera to it; see docs/discovery.md).

The same question tells a silent camera (no answer: timeout) from a port that answers in
something else than RTSP (junk), with words an installer can act on. Blocking: runs in the
camera's pull thread.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from agent.errors import SourceError
from agent.media import rtsp

#: The documented message for a camera that does not answer (docs/operations.md).
TIMEOUT = "no answer from the camera (timeout): check address and network"
NOT_RTSP = ("the camera's port answers, but not in RTSP: check the port in source (554 is "
            "RTSP's; 80 and 8000 are usually the web interface)")
_READ = 4096


@dataclass(frozen=True)
class Challenge:
    """The camera's answer to DESCRIBE without credentials."""

    status: int
    schemes: frozenset[str]  # lower case, from WWW-Authenticate

    @property
    def scheme(self) -> str:
        """digest | basic | none (no credentials asked) | other."""
        if self.status != 401:
            return "none"
        if "digest" in self.schemes:
            return "digest"
        return "basic" if "basic" in self.schemes else "other"


class AuthDowngradeError(SourceError):
    """The camera asks for Basic where only Digest may carry its password."""


def ask(url: str, timeout: float, *, describe: bool = True) -> Challenge:
    """OPTIONS then DESCRIBE without credentials on one short connection, all within
    ``timeout`` seconds; raises :class:`SourceError` with the installer's reason.

    Without ``describe`` only OPTIONS is sent: enough to tell silence and junk from RTSP.
    (An open camera answers DESCRIBE by preparing its stream, which a camera that then sees
    the connection close may still be tearing down when FFmpeg asks: a 503.)"""
    t = rtsp.target(url)
    if t.scheme != "rtsp":  # rtsps: FFmpeg's TLS session is its own; nothing to ask first
        return Challenge(0, frozenset())
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((t.host, t.port), timeout=timeout) as sock:
            head = _exchange(sock, "OPTIONS", t.url, deadline, 1)
            if describe:
                head = _exchange(sock, "DESCRIBE", t.url, deadline, 2)
    except TimeoutError:
        raise SourceError(TIMEOUT) from None
    except ConnectionRefusedError:
        raise SourceError("connection refused: the camera is not listening on this port") from None
    except rtsp.RtspProtocolError:
        raise SourceError(NOT_RTSP) from None
    except OSError as exc:
        raise SourceError(exc.strerror or "the connection to the camera failed") from None
    schemes = frozenset(rtsp.parse_challenge(v).scheme for v in head.all("WWW-Authenticate"))
    return Challenge(head.status, schemes)


def _exchange(sock: socket.socket, method: str, url: str, deadline: float,
              cseq: int) -> rtsp.Response:
    headers = {"Accept": "application/sdp"} if method == "DESCRIBE" else None
    sock.sendall(rtsp.request(method, url, cseq, headers))
    data = b""
    while b"\r\n\r\n" not in data:
        if data and not b"RTSP/".startswith(data[:5]):  # binary or HTTP: fail at once
            raise rtsp.RtspProtocolError("not RTSP")
        if len(data) > rtsp.MAX_HEADER:
            raise rtsp.RtspProtocolError("headers too long")
        chunk = _recv(sock, deadline)
        if not chunk:
            if data:
                raise rtsp.RtspProtocolError("the answer ended early")
            raise ConnectionResetError(0, "the camera closed the connection")
        data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    response = rtsp.parse_head(head_bytes + b"\r\n")
    try:
        body = max(int(response.header("Content-Length") or 0), 0)
    except ValueError:
        raise rtsp.RtspProtocolError("a Content-Length that is not a number") from None
    if body > rtsp.MAX_BODY:
        raise rtsp.RtspProtocolError("body too long")
    while len(rest) < body:  # the SDP: read and dropped, the connection stays in step
        chunk = _recv(sock, deadline)
        if not chunk:
            break
        rest += chunk
    return response


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    return sock.recv(_READ)


class Memory:
    """Which scheme each camera asked for last (per process): how a downgrade is seen for
    cameras whose first scheme was not recorded elsewhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, str] = {}

    def get(self, camera_id: str) -> str | None:
        with self._lock:
            return self._seen.get(camera_id)

    def note(self, camera_id: str, scheme: str) -> None:
        if scheme not in ("digest", "basic"):
            return
        with self._lock:
            # Once Digest, always Digest in this process: a Basic answer later never erases it.
            if self._seen.get(camera_id) != "digest":
                self._seen[camera_id] = scheme


MEMORY = Memory()


def send_credentials(rule: str, before: str | None, challenge: Challenge, where: str) -> bool:
    """Whether FFmpeg may have the credentials for this challenge; raises
    :class:`AuthDowngradeError` when the camera wants Basic where only Digest may go."""
    digest_only = rule == "digest" or (rule == "auto" and before == "digest")
    if challenge.scheme == "digest":
        return True
    if challenge.scheme == "basic":
        if digest_only:
            why = ("it used Digest before" if before == "digest"
                   else "it moved since adoption")
            raise AuthDowngradeError(
                f"the camera at {where} asks for the password in clear (RTSP Basic) where only "
                f"Digest may carry it ({why}): refused, the password was not sent. If the "
                "camera's settings really changed, allow Basic for it (cameras[].rtsp_auth: "
                "basic, or `therelay-agent cameras allow-basic ID` for an adopted camera)")
        return True
    # No challenge (an open camera, or one that asks only at SETUP): credentials go to a
    # camera that may still get them in clear only if the rule allows Basic.
    return not digest_only and challenge.scheme == "none"


def login_url(camera_id: str, url: str, username: str, password: str, rule: str,
              timeout: float) -> str:
    """The URL FFmpeg opens: with the credentials when the camera's challenge allows."""
    from agent.media.sources.pyav import with_credentials  # noqa: PLC0415 (cycle)

    challenge = ask(url, timeout)
    where = rtsp.target(url).host
    if challenge.status == 0:  # rtsps: not asked
        return with_credentials(url, username, password)
    send = send_credentials(rule, MEMORY.get(camera_id), challenge, where)
    MEMORY.note(camera_id, challenge.scheme)
    return with_credentials(url, username, password) if send else url
