"""Checks of each camera: what applies to its source (RTSP, test pattern, file).

RTSP: the name resolves, the port accepts a connection, DESCRIBE succeeds with the
configured credentials, the SDP's video codec is one viewers can play, and (apart) whether
the camera answers ONVIF. Each network step has its own timeout; a later step is skipped,
with the reason, when an earlier one failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from agent.config import CameraConfig, read_secret
from agent.doctor.model import Result, Status, result
from agent.errors import ConfigError, SecretFileExposed, SourceError
from agent.logs import redact_text
from agent.media import rtsp

ONVIF_PATH = "/onvif/device_service"  # the device service's usual address (ONVIF Core)
# ONVIF Core lets GetSystemDateAndTime be called without authentication: clients need the
# device clock before they can build a WS-UsernameToken digest.
ONVIF_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope">'
    '<s:Body xmlns:tds="http://www.onvif.org/ver10/device/wsdl">'
    "<tds:GetSystemDateAndTime/></s:Body></s:Envelope>"
)

H265_FIX = ("WebRTC in every browser needs H.264: set the camera's substream to H.264 in its "
            "web interface and point source at it (the agent does not transcode); keep "
            "webrtc.send_path: agent (the default) for browsers that offer H.265")
OTHER_FIX = ("set the camera's stream (usually the substream) to H.264 in its web interface and "
             "point source at that stream; the agent does not transcode")
#: Who plays each codec the agent serves (docs/viewing.md, "H.265 cameras").
VIEWERS = {
    "h264": "H.264 video: every viewer plays it — WebRTC (all browsers), HLS, RTSP",
    "hevc": ("H.265 (HEVC) video: RTSP clients (VLC, ffmpeg, a VMS) and HLS (Safari; Chrome "
             "and Edge with hardware HEVC decoding) play it; WebRTC only in browsers that offer "
             "H.265 (Chrome 136+, Safari where the device decodes it), others get 501 "
             "unsupported_codec"),
}


def group(camera: CameraConfig) -> str:
    return f"camera {camera.id}"


def _credentials(camera: CameraConfig) -> tuple[str | None, str | None]:
    if not camera.username:
        return None, None
    password = read_secret(f"camera-{camera.id}", camera.password_file)
    if password is None:
        raise ConfigError(f"cameras: {camera.id!r} has a username but no password: set "
                          f"password_file or load the systemd credential camera-{camera.id}")
    return camera.username, password


def judge_codec(g: str, codec: str | None, where: str) -> Result:
    if codec is None:
        return result(g, "codec", Status.FAIL, f"{where} has no video",
                      "point source at a stream with video (the camera's main or substream)")
    if codec == "h264":
        return result(g, "codec", Status.OK, VIEWERS[codec])
    if codec == "hevc":
        return result(g, "codec", Status.WARN, VIEWERS[codec], H265_FIX)
    return result(g, "codec", Status.FAIL,
                  f"{codec.upper()} video: the agent serves H.264 and H.265 only", OTHER_FIX)


async def check_rtsp_camera(camera: CameraConfig, timeout: float) -> list[Result]:
    """dns → tcp → rtsp → codec, in order; each step bounded by ``timeout``."""
    g = group(camera)
    try:
        user, password = await asyncio.to_thread(_credentials, camera)
        t = rtsp.target(camera.source, user, password)
    except (ConfigError, ValueError) as exc:
        return [result(g, "source", Status.FAIL, str(exc),
                       exc.fix if isinstance(exc, SecretFileExposed)
                       else "fix the camera's source, username or password_file")]
    addresses, found = await _resolve(g, t, timeout)
    out = [found]
    if not addresses:
        return out + _skipped(g, ("tcp", "rtsp", "codec"), "the name did not resolve")
    conn, address, connected = await _connect(g, t, addresses, timeout)
    out.append(connected)
    if conn is None:
        return out + _skipped(g, ("rtsp", "codec"), "no connection")
    try:
        described = await asyncio.wait_for(
            rtsp.describe(conn, t, address, basic=camera.rtsp_auth != "digest"), timeout)
    except TimeoutError:
        out.append(result(g, "rtsp", Status.FAIL,
                          f"the camera accepted the connection but did not answer DESCRIBE "
                          f"within {timeout:g} s", "check that this port serves RTSP (not "
                          "HTTP or another service), then raise --timeout for a slow camera"))
        return out + _skipped(g, ("codec",), "no description")
    except (rtsp.RtspProtocolError, OSError) as exc:
        out.append(result(g, "rtsp", Status.FAIL, f"no RTSP answer: {exc}",
                          "check that the port in source is the camera's RTSP port"))
        return out + _skipped(g, ("codec",), "no description")
    out.append(_judge_describe(g, camera, described))
    if described.response.status != 200:
        return out + _skipped(g, ("codec",), "no description")
    out.append(judge_codec(g, rtsp.video_codec(described.sdp), "the camera's stream"))
    return out


def _skipped(g: str, names: tuple[str, ...], why: str) -> list[Result]:
    return [result(g, n, Status.SKIP, why) for n in names]


async def _resolve(g: str, t: rtsp.Target, timeout: float) -> tuple[list[str], Result]:
    try:
        ipaddress.ip_address(t.host)
        return [t.host], result(g, "dns", Status.OK, f"{t.host} is an address (no lookup)")
    except ValueError:
        pass
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            t.host, t.port, type=socket.SOCK_STREAM), timeout)
    except (socket.gaierror, TimeoutError) as exc:
        why = "no answer in time" if isinstance(exc, TimeoutError) else exc.strerror
        return [], result(g, "dns", Status.FAIL, f"the name {t.host} does not resolve ({why})",
                          "check the spelling, or use the camera's IP address in source (give "
                          "the camera a fixed address or a DHCP reservation); check this "
                          "machine's DNS (/etc/resolv.conf)")
    addresses = list(dict.fromkeys(str(i[4][0]) for i in infos))
    return addresses, result(g, "dns", Status.OK, f"{t.host} is {', '.join(addresses[:4])}")


async def _connect(g: str, t: rtsp.Target, addresses: list[str],
                   timeout: float) -> tuple[rtsp.Connection | None, str, Result]:
    errors: list[str] = []
    for address in addresses:
        started = time.monotonic()
        try:
            conn = await asyncio.wait_for(rtsp.Connection.open(t, address), timeout)
        except ConnectionRefusedError:
            errors.append("refused")
            continue
        except TimeoutError:
            errors.append("timeout")
            continue
        except OSError as exc:
            errors.append(exc.strerror or str(exc))
            continue
        ms = (time.monotonic() - started) * 1000
        return conn, address, result(g, "tcp", Status.OK, f"{address} port {t.port} accepts "
                                     f"connections ({ms:.0f} ms)")
    if "refused" in errors:
        finding = (f"connection refused on {t.host} port {t.port}: the camera is not "
                   "listening on this port")
        fix = ("check the port in source (RTSP is usually 554), and that RTSP is enabled in "
               "the camera's settings")
    elif "timeout" in errors:
        finding = f"no answer from {t.host} port {t.port} within {timeout:g} s"
        fix = ("check the camera's address and that it is powered and on this network; a "
               "firewall may drop the connection")
    else:
        finding = f"cannot connect to {t.host} port {t.port}: {errors[0]}"
        fix = "check the address and this machine's network and routes (ip route)"
    return None, addresses[0], result(g, "tcp", Status.FAIL, finding, fix)


def _judge_describe(g: str, camera: CameraConfig, d: rtsp.Description) -> Result:
    r = d.response
    if r.status == 200:
        # (Not "Basic authentication": redact_text takes the word after Basic for a secret.)
        how = f"; credentials accepted ({d.auth_scheme.capitalize()})" if d.auth_scheme else ""
        return result(g, "rtsp", Status.OK, f"DESCRIBE answered 200{how}")
    if r.status == 401 and d.sent_credentials:
        return result(g, "rtsp", Status.FAIL,
                      "the camera refused the credentials (401): check username and password",
                      f"fix username (now {camera.username!r}) or the password in "
                      "password_file (or the systemd credential camera-" + camera.id + ")")
    if r.status == 401:
        schemes = sorted({c.scheme for c in d.challenges}) or ["an unknown scheme"]
        if camera.username or urlsplit(camera.source).username:
            return result(g, "rtsp", Status.FAIL,
                          f"the camera asks for {', '.join(schemes)} authentication, which "
                          "this agent cannot answer", "create a camera user allowed to use "
                          "Digest (MD5, SHA-256) or Basic")
        return result(g, "rtsp", Status.FAIL,
                      f"the camera needs credentials ({', '.join(schemes)}) and none are set",
                      "set username and password_file for this camera (or the systemd "
                      f"credential camera-{camera.id})")
    if r.status == 404:
        return result(g, "rtsp", Status.FAIL,
                      "the camera has no stream at this path (404): check the URL path",
                      "use the path from the camera's manual or its ONVIF GetStreamUri (e.g. "
                      "/Streaming/Channels/102)")
    if r.status == 403:
        return result(g, "rtsp", Status.FAIL, "the camera forbids this user the stream (403)",
                      "give the user the right to view live video in the camera's settings")
    return result(g, "rtsp", Status.FAIL,
                  f"the camera answered DESCRIBE with {r.status} {r.reason}",
                  "check the URL path and the camera's RTSP settings")


async def check_onvif(camera: CameraConfig, timeout: float) -> Result:
    """An unauthenticated GetSystemDateAndTime at http://<host>/onvif/device_service."""
    g = group(camera)
    host = urlsplit(camera.source).hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    url = f"http://{netloc}{ONVIF_PATH}"
    none = "RTSP works without it; ONVIF only lets discovery find the camera"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.post(url, data=ONVIF_BODY.encode(), allow_redirects=False, headers={
                    "Content-Type": "application/soap+xml; charset=utf-8"}) as response:
            body = await response.content.read(64 * 1024)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = "no answer in time" if isinstance(exc, TimeoutError) else _client_error(exc)
        return result(g, "onvif", Status.INFO, f"no ONVIF device service at {url} ({why}); "
                      f"{none}")
    text = body.decode("utf-8", "replace")
    if response.status == 200 and "GetSystemDateAndTimeResponse" in text:
        return result(g, "onvif", Status.OK, f"ONVIF device service answers at {url}")
    if "Fault" in text and response.status in (400, 401, 500):
        return result(g, "onvif", Status.WARN,
                      f"ONVIF at {url} refused an unauthenticated GetSystemDateAndTime "
                      f"({response.status})", "the camera's ONVIF may need its clock set or "
                      "ONVIF users enabled; needed only for discovery")
    return result(g, "onvif", Status.INFO, f"no ONVIF device service at {url} (HTTP "
                  f"{response.status}); {none}")


def _client_error(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        return os.strerror(exc.os_error.errno).lower()
    return redact_text(str(exc)) or type(exc).__name__


def testsrc_sync(camera: CameraConfig) -> list[Result]:
    from agent.media.sources.testsrc import parse_options  # noqa: PLC0415 (imports PyAV)

    g = group(camera)
    try:
        opts = parse_options(camera.source)
    except SourceError as exc:
        return [result(g, "source", Status.FAIL, str(exc), "fix the testsrc:// options")]
    import av  # noqa: PLC0415 (slow import, only when a camera needs it)

    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError
        return [result(g, "source", Status.OK, "test pattern options valid"),
                result(g, "encoder", Status.FAIL,
                       "PyAV's FFmpeg has no libx264 encoder: the test pattern cannot be made",
                       "reinstall PyAV's wheel, which bundles libx264: .venv/bin/pip install "
                       "--force-reinstall av")]
    return [result(g, "source", Status.OK,
                   f"test pattern {opts['width']}x{opts['height']} at {opts['fps']} fps"),
            result(g, "encoder", Status.OK, "libx264 is available in PyAV")]


def file_sync(camera: CameraConfig, timeout: float) -> list[Result]:
    g = group(camera)
    path = Path(urlsplit(camera.source).path)
    fix = "point source at an existing file, as file:///absolute/path.mp4"
    if not path.is_file():
        return [result(g, "file", Status.FAIL, f"no such file: {path}", fix),
                result(g, "codec", Status.SKIP, "no file")]
    if not os.access(path, os.R_OK):
        return [result(g, "file", Status.FAIL, f"{path} is not readable by this user",
                       f"chmod a+r {path}, or make the agent's user its owner"),
                result(g, "codec", Status.SKIP, "file not readable")]
    import av  # noqa: PLC0415 (slow import, only when a camera needs it)

    try:
        with av.open(str(path), timeout=timeout) as container:
            video = container.streams.video[0] if container.streams.video else None
            codec = video.codec_context.name if video is not None else None
    except (av.error.FFmpegError, OSError) as exc:
        return [result(g, "file", Status.FAIL, f"{path} cannot be demuxed: "
                       f"{type(exc).__name__}", "use an MP4 or MKV file with H.264 video"),
                result(g, "codec", Status.SKIP, "file not readable")]
    return [result(g, "file", Status.OK, f"{path} is readable"),
            judge_codec(g, codec, str(path))]
