"""ONVIF device queries: identity, services, media profiles and their stream URIs.

Built on onvif-zeep-async (asyncio, bundled WSDLs). One call, :func:`query_device`, reads a
camera the way an installer needs it: who made it, which profiles it streams, and the RTSP
URI of each (RTP-Unicast over RTSP, ONVIF Media ver10). The camera's clock is read first,
unauthenticated (``GetSystemDateAndTime`` is PRE_AUTH, ONVIF Core §5.9.4.2), and its offset
from ours is added to the WS-Security ``Created`` timestamp: cameras reject digests whose
timestamp is too far from their own clock, and many run with a wrong clock. The library does
this itself when built with ``adjust_time=True`` (``UsernameDigestTokenDtDiff``); we turn it on
and report the offset.

Errors, all :class:`OnvifError` (an :class:`~agent.errors.AgentError`) with a message for the
installer, never containing the password::

    OnvifError
    ├── OnvifAuthError         the camera rejected the user name or password
    ├── NotOnvifError          something answers HTTP there, but it is not an ONVIF device
    ├── OnvifUnreachableError  refused, no route, or no TCP answer at all
    ├── OnvifTimeoutError      connected, but no complete answer within the timeout
    ├── OnvifProtocolError     an ONVIF-looking answer we refuse (entity declarations, garbage)
    └── OnvifProfileError      choose_profile found no profile matching the request
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
import zeep.exceptions
from onvif import ONVIFCamera  # type: ignore[import-untyped]
from onvif.client import _WSDL_PATH, _cached_document  # type: ignore[import-untyped]
from onvif.definition import SERVICES  # type: ignore[import-untyped]
from onvif.exceptions import ONVIFError  # type: ignore[import-untyped]

from agent.errors import AgentError

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEVICE_PATH = "/onvif/device_service"
NS_MEDIA = "http://www.onvif.org/ver10/media/wsdl"
# ONVIF Media §5.15.1 (GetStreamUri): unicast RTP, carried over the RTSP connection.
STREAM_SETUP = {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}}
_ENCODINGS = {"H264": "H264", "H.264": "H264", "AVC": "H264", "H265": "H265", "H.265": "H265",
              "HEVC": "H265", "JPEG": "JPEG", "MJPEG": "JPEG", "MPEG4": "MPEG4"}  # fmt: skip


class OnvifError(AgentError):
    """An ONVIF query failed; the message says why, for the installer."""


class OnvifAuthError(OnvifError):
    """The camera rejected the user name or password."""


class NotOnvifError(OnvifError):
    """Something answers at that address, but it is not an ONVIF device service."""


class OnvifUnreachableError(OnvifError):
    """Nothing accepted a TCP connection at that address (refused, no route, no answer)."""


class OnvifTimeoutError(OnvifError):
    """The device accepted the connection but did not answer within the timeout."""


class OnvifProtocolError(OnvifError):
    """The device's answer was refused: hostile or malformed XML, or an unexpected fault."""


class OnvifProfileError(OnvifError):
    """No media profile matches what was asked for."""


@dataclass(frozen=True)
class OnvifProfile:
    """One media profile, with the URIs exactly as the camera gave them (no credentials)."""

    token: str
    name: str
    encoding: str | None  # "H264", "H265", "JPEG" (MPEG4 on old cameras); None: no encoder
    width: int | None
    height: int | None
    fps: float | None
    bitrate_kbps: int | None
    stream_uri: str | None
    snapshot_uri: str | None


@dataclass(frozen=True)
class OnvifDevice:
    """What a camera told us about itself."""

    xaddr: str
    manufacturer: str | None
    model: str | None
    firmware: str | None
    serial: str | None
    hardware_id: str | None
    profiles: tuple[OnvifProfile, ...]
    clock_offset_s: float  # camera clock minus ours, seconds (whole seconds: ONVIF's precision)
    services: tuple[tuple[str, str], ...] = ()  # (namespace, XAddr) the device announced


# -- public API ---------------------------------------------------------------------------


async def query_device(
    xaddr: str, username: str | None, password: str | None, *, timeout: float = 10.0
) -> OnvifDevice:
    """Ask the device service at ``xaddr`` (a URL, or ``host[:port]``) for identity and profiles.

    The whole exchange, connection included, is bounded by ``timeout`` seconds. Every session
    and connection it opened is closed on return, on error and on cancellation.
    """
    return await _exchange(xaddr, username, password, timeout, _query)


async def set_synchronization_point(
    xaddr: str, username: str | None, password: str | None, profile_token: str, *,
    timeout: float = 10.0,
) -> None:
    """Ask the camera for a keyframe now (ONVIF Media ``SetSynchronizationPoint``) on the
    profile ``profile_token``. Bounded and cleaned up like :func:`query_device`."""

    async def work(camera: _Camera, _url: str, where: str) -> None:
        await camera.update_xaddrs()
        if NS_MEDIA not in camera.xaddrs:
            raise NotOnvifError(f"the ONVIF device at {where} offers no media service")
        media = await camera.create_media_service()
        await media.SetSynchronizationPoint({"ProfileToken": profile_token})

    await _exchange(xaddr, username, password, timeout, work)


async def _exchange(
    xaddr: str, username: str | None, password: str | None, timeout: float,
    work: Callable[[_Camera, str, str], Awaitable[T]],
) -> T:
    """Run ``work(camera, url, where)`` against the device service at ``xaddr``: bounded by
    ``timeout`` (connection included), errors translated, sessions closed on every exit."""
    url = _device_url(xaddr)
    parts = urlsplit(url)
    where = _display(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await _reach(host, port, where, timeout)
    await _load_wsdls()
    camera = _Camera(url, host, port, username, password)
    try:
        async with asyncio.timeout_at(deadline):
            return await work(camera, url, where)
    except TimeoutError:
        raise OnvifTimeoutError(
            f"the ONVIF device at {where} accepted the connection but did not answer within "
            f"{timeout:g} s; it may be overloaded, or this port is not its ONVIF port"
        ) from None
    except OnvifError:
        raise
    except Exception as exc:
        raise _translate(exc, where) from exc
    finally:
        await _close(camera)


def choose_profile(device: OnvifDevice, want: str) -> OnvifProfile:
    """``"main"`` (highest resolution), ``"sub"`` (lowest), or a profile token (taken as is,
    whatever its codec: the installer's choice wins). Main and sub are H.264 profiles when
    the camera has one, even if an H.265 profile is larger or listed first: every browser
    plays H.264 over WebRTC. A camera with no H.264 stream gets its H.265 one
    (:func:`choice_note` says what that means for viewers)."""
    if want in ("main", "sub"):
        for encoding in ("H264", "H265"):
            found = _by_size(device, encoding)
            if found:
                return found[-1] if want == "main" else found[0]
        listed = ", ".join(_describe(p) for p in device.profiles) or "none"
        raise OnvifProfileError(
            f"the camera offers no H.264 or H.265 stream (its profiles: {listed}); set its "
            "main stream or substream to H.264 in the camera's own settings"
        )
    for profile in device.profiles:
        if profile.token == want:
            return profile
    tokens = ", ".join(p.token for p in device.profiles) or "none"
    raise OnvifProfileError(
        f"the camera has no profile {want!r} (its profiles: {tokens}); use main, sub or one of "
        "these tokens"
    )


def choice_note(device: OnvifDevice, want: str, chosen: OnvifProfile) -> str | None:
    """What the installer should know about the codec of the profile ``main``/``sub`` chose:
    an H.264 profile taken over an H.265 one, or an H.265 one for want of H.264. None for a
    token given explicitly, or when there was nothing to choose between."""
    if want not in ("main", "sub"):
        return None
    if chosen.encoding == "H265":
        return (f"profile {chosen.token!r} is H.265 (the camera has no H.264 stream): RTSP "
                "clients (VLC, ffmpeg, a VMS) and HLS play it, WebRTC only in browsers that "
                "offer H.265 (Chrome 136+, Safari); set its substream to H.264 in the "
                "camera's settings for every browser")
    hevc = _by_size(device, "H265")
    if chosen.encoding != "H264" or not hevc:
        return None
    other = hevc[-1] if want == "main" else hevc[0]
    return (f"profile {chosen.token!r} (H.264) chosen over {other.token!r} (H.265): browsers "
            "play H.264 over WebRTC; --profile "
            f"{other.token} takes the H.265 stream instead (RTSP, HLS, and WebRTC in "
            "Chrome 136+/Safari)")


def _by_size(device: OnvifDevice, encoding: str) -> list[OnvifProfile]:
    """The profiles of ``encoding`` that have a stream, smallest first."""
    found = [p for p in device.profiles if p.encoding == encoding and p.stream_uri]
    found.sort(key=lambda p: ((p.width or 0) * (p.height or 0), p.fps or 0, p.bitrate_kbps or 0))
    return found


def with_host(uri: str, host: str) -> str:
    """``uri`` with its host replaced by ``host`` (keeping the URI's port unless ``host`` has one).

    Cameras behind NAT, or whose address changed since they were configured, report URIs with
    a stale host; the address we reached them at is the one to use.
    """
    parts = urlsplit(uri)
    if not parts.netloc:
        raise ValueError(f"not an absolute URI: {uri!r}")
    userinfo, _, _ = parts.netloc.rpartition("@")
    new_host, new_port = _split_host_port(host)
    if ":" in new_host:
        new_host = f"[{new_host}]"
    port = new_port if new_port is not None else parts.port
    netloc = new_host if port is None else f"{new_host}:{port}"
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


async def warm_up() -> None:
    """Parse the bundled WSDLs now, in a thread, instead of during the first query.

    Worth calling once at start-up: the parsed documents stay in memory (about 0.2-0.4 s of
    CPU to build). They are a large object graph, and a full garbage collection walking it
    took 45-99 ms here; ``gc.freeze()`` after this call moves it out of the collector's way
    (full collections then took 1-3 ms).
    """
    await _load_wsdls()


# -- the exchange -------------------------------------------------------------------------


class _Camera(ONVIFCamera):  # type: ignore[misc]
    """ONVIFCamera that uses the device service URL it was given, not a guessed path."""

    def __init__(self, url: str, host: str, port: int, user: str | None,
                 password: str | None) -> None:
        super().__init__(host, port, user, password or "", adjust_time=True)
        self.device_url = url

    def get_definition(self, name: str, port_type: str | None = None) -> tuple[str, str, str]:
        xaddr, wsdl, binding = super().get_definition(name, port_type)
        if name == "devicemgmt":
            xaddr = self.device_url  # discovery gives the real path (/onvif/services on some)
        return xaddr, wsdl, binding

    async def create_onvif_service(self, name: str, port_type: str | None = None,
                                   read_timeout: int | None = None,
                                   write_timeout: int | None = None) -> Any:
        service = await super().create_onvif_service(name, port_type, read_timeout, write_timeout)
        if self.user is None:
            service.zeep_client.wsse = None  # no credentials: send no UsernameToken at all
        return service


async def _query(camera: _Camera, url: str, where: str) -> OnvifDevice:
    await camera.update_xaddrs()
    offset = camera.dt_diff.total_seconds() if camera.dt_diff is not None else 0.0
    devicemgmt = await camera.create_devicemgmt_service()
    info = await devicemgmt.GetDeviceInformation()
    if NS_MEDIA not in camera.xaddrs:
        raise NotOnvifError(
            f"the ONVIF device at {where} offers no media service: it is not a camera "
            "(an NVR's or a door station's management interface?)"
        )
    media = await camera.create_media_service()
    profiles = []
    for raw in await media.GetProfiles() or []:
        token = str(raw.token)
        stream = await _optional_uri(media.GetStreamUri(
            {"StreamSetup": STREAM_SETUP, "ProfileToken": token}))
        snapshot = await _optional_uri(media.GetSnapshotUri({"ProfileToken": token}))
        profiles.append(_profile(raw, stream, snapshot))
    log.info("onvif_device_queried", device=where, profiles=len(profiles), clock_offset_s=offset)
    return OnvifDevice(
        xaddr=url,
        manufacturer=_text(info.Manufacturer),
        model=_text(info.Model),
        firmware=_text(info.FirmwareVersion),
        serial=_text(info.SerialNumber),
        hardware_id=_text(info.HardwareId),
        profiles=tuple(profiles),
        clock_offset_s=offset,
        services=tuple(sorted(camera.xaddrs.items())),
    )


async def _optional_uri(call: Awaitable[Any]) -> str | None:
    """A URI the camera may decline to give (no snapshot support, say): None then."""
    try:
        result = await call
    except zeep.exceptions.Fault as fault:
        if _is_auth_fault(fault):
            raise
        return None
    return _text(getattr(result, "Uri", None))


def _profile(raw: Any, stream: str | None, snapshot: str | None) -> OnvifProfile:
    encoder = getattr(raw, "VideoEncoderConfiguration", None)
    resolution = getattr(encoder, "Resolution", None)
    rate = getattr(encoder, "RateControl", None)
    encoding = _text(getattr(encoder, "Encoding", None))
    return OnvifProfile(
        token=str(raw.token),
        name=_text(getattr(raw, "Name", None)) or str(raw.token),
        encoding=_ENCODINGS.get(encoding.upper(), encoding.upper()) if encoding else None,
        width=_int(getattr(resolution, "Width", None)),
        height=_int(getattr(resolution, "Height", None)),
        fps=_float(getattr(rate, "FrameRateLimit", None)),
        bitrate_kbps=_int(getattr(rate, "BitrateLimit", None)),
        stream_uri=stream,
        snapshot_uri=snapshot,
    )


# -- errors -------------------------------------------------------------------------------


async def _reach(host: str, port: int, where: str, timeout: float) -> None:
    """Open (and close) one TCP connection first, so that "nothing there" is told apart."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        raise OnvifUnreachableError(
            f"nothing answered at {where} within {timeout:g} s; check that the camera is on, "
            "on this network, and that this is its ONVIF port"
        ) from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OnvifUnreachableError(
            f"cannot connect to {where} ({reason}); check the address and the ONVIF port "
            "(often 80, 8000 or 2020), and that ONVIF is enabled in the camera"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _translate(exc: BaseException, where: str) -> OnvifError:
    """Map what the library and zeep raise to an installer's message."""
    if isinstance(exc, ONVIFError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, zeep.exceptions.Fault):
        if _is_auth_fault(exc):
            return OnvifAuthError(
                f"the camera at {where} rejected the user name or password (ONVIF user; some "
                "cameras keep ONVIF users apart from web users, and lock out after failures)"
            )
        if exc.code is None and not exc.subcodes:
            return NotOnvifError(
                f"the device at {where} answers HTTP but is not an ONVIF device (no SOAP "
                "answer); check the address and port, and that ONVIF is enabled in the camera"
            )
        return OnvifProtocolError(f"the camera at {where} refused the request: {exc.message}")
    if isinstance(exc, zeep.exceptions.TransportError):
        if exc.status_code == 401:
            return OnvifAuthError(
                f"the camera at {where} rejected the user name or password (HTTP 401)"
            )
        return NotOnvifError(
            f"the device at {where} is not an ONVIF device (HTTP {exc.status_code} without a "
            "SOAP answer); check the address and port"
        )
    if isinstance(exc, zeep.exceptions.DTDForbidden | zeep.exceptions.EntitiesForbidden):
        return OnvifProtocolError(
            f"the device at {where} sent XML with entity declarations, which no ONVIF device "
            "sends; refused without expanding them"
        )
    if isinstance(exc, zeep.exceptions.XMLSyntaxError | zeep.exceptions.XMLParseError):
        return NotOnvifError(
            f"the device at {where} is not an ONVIF device (its answer is not SOAP XML); "
            "check the address and port"
        )
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return OnvifUnreachableError(f"the connection to {where} failed: {exc.__class__.__name__}")
    if isinstance(exc, aiohttp.ClientError):
        return NotOnvifError(f"the device at {where} is not an ONVIF device (bad HTTP answer)")
    return OnvifProtocolError(
        f"the camera at {where} sent an answer that could not be read ({exc.__class__.__name__})"
    )


def _is_auth_fault(fault: zeep.exceptions.Fault) -> bool:
    names = [getattr(code, "localname", str(code)) for code in fault.subcodes or []]
    message = str(fault.message or "").lower()
    return "NotAuthorized" in names or "not authorized" in message or "unauthorized" in message


# -- plumbing -----------------------------------------------------------------------------

_wsdl_lock: asyncio.Lock | None = None


async def _load_wsdls() -> None:
    """Parse the device and media WSDLs once, in a thread (≈0.3 s of CPU, blocking I/O)."""
    global _wsdl_lock  # noqa: PLW0603 - one lazily made lock: no loop exists at import time
    if _wsdl_lock is None:
        _wsdl_lock = asyncio.Lock()
    async with _wsdl_lock:
        for name in ("devicemgmt", "media"):
            await _cached_document(os.path.join(_WSDL_PATH, SERVICES[name]["wsdl"]))


async def _close(camera: _Camera) -> None:
    """Close every session the camera object opened; never raises, survives cancellation."""
    try:
        await asyncio.shield(camera.close())
    except Exception as exc:  # closing must not hide the real outcome
        log.debug("onvif_close_failed", error=exc.__class__.__name__)


def _device_url(xaddr: str) -> str:
    text = xaddr.strip()
    if "://" not in text:
        text = f"http://{text}{DEVICE_PATH}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an ONVIF device address: {xaddr!r}")
    netloc = parts.netloc.rpartition("@")[2]  # credentials never travel in the URL
    return urlunsplit(parts._replace(netloc=netloc, path=parts.path or DEVICE_PATH))


def _display(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2]


def _split_host_port(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        return inner, int(rest[1:]) if rest.startswith(":") else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, int(port)
    return host, None


def _describe(p: OnvifProfile) -> str:
    size = f" {p.width}x{p.height}" if p.width and p.height else ""
    return f"{p.token} {p.encoding or 'no video'}{size}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(value: Any) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


__all__ = [
    "NotOnvifError", "OnvifAuthError", "OnvifDevice", "OnvifError", "OnvifProfile",
    "OnvifProfileError", "OnvifProtocolError", "OnvifTimeoutError", "OnvifUnreachableError",
    "choice_note", "choose_profile", "query_device", "warm_up", "with_host",
]  # fmt: skip
