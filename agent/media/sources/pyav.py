"""RTSP cameras and recorded files, demuxed (never decoded) with PyAV."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import av
import av.error

from agent.errors import SourceError
from agent.media import rtsp
from agent.media.audio import AudioPath
from agent.media.sources import OPEN_DEADLINE, rtsp_login, undelivered
from agent.media.stream import (
    AudioInfo,
    MediaPacket,
    StreamInfo,
    annexb_parameter_sets,
    with_parameter_sets,
)

# probesize=32 + analyzeduration=0 opens in ~60 ms when the SDP carries
# SPS/PPS; without them the fast open sees no size, and we open again with normal probing
# (docs/field-notes.md, PyAV).
FAST_OPEN = {"probesize": "32", "analyzeduration": "0"}


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """Put credentials given apart from the URL into it (percent-encoded)."""
    if not username:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(username, safe='')}:{quote(password or '', safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


#: Seconds an RTSP server gets to tear down what the login's DESCRIBE prepared, after it
#: answered FFmpeg's DESCRIBE with a 5xx (GStreamer here: 0.05 s was enough, at once was not).
SETTLE_AFTER_LOGIN = 0.3


def describe_error(exc: BaseException) -> str:
    """A camera failure in words an installer can act on (no credentials)."""
    if isinstance(exc, av.error.HTTPUnauthorizedError):
        return "the camera refused the credentials (401): check username and password"
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "the camera has no stream at this path (404): check the URL path"
    if isinstance(exc, av.error.ConnectionRefusedError):
        return "connection refused: the camera is not listening on this port"
    if isinstance(exc, av.error.TimeoutError | TimeoutError):
        return rtsp_login.TIMEOUT
    if isinstance(exc, av.error.ExitError | av.error.EOFError):
        return "the camera closed the stream"
    if isinstance(exc, av.error.HTTPServerError):
        return ("the camera answered with a server error (5xx): it may be starting up or "
                "overloaded, or it refuses more connections")
    if isinstance(exc, av.error.InvalidDataError):
        return ("the camera sent data the agent cannot read as an RTSP stream of H.264 (a "
                "non-RTSP port, or a broken stream)")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}"


class PyAVSource:
    """Demuxes the first video stream (and the first audio stream) of a URL or file."""

    def __init__(
        self,
        url: str,
        options: dict[str, str],
        *,
        audio_mode: str = "auto",
        realtime: bool = False,
        loop: bool = False,
        open_deadline: float | None = None,
        login: Callable[[float], str] | None = None,
        diagnose: Callable[[float], None] | None = None,
    ) -> None:
        self._diagnose = diagnose  # after a failed open: raises the installer's reason
        self._url = url
        self._open_deadline = open_deadline
        self._login = login  # asks the camera first; gives the URL FFmpeg may open
        self._options = options
        self._audio_mode = audio_mode
        self._realtime = realtime
        self._loop = loop
        self._container: Any = None
        self._packets: Iterator[Any] | None = None
        self._bsf: Any = None
        self._audio: AudioPath | None = None
        self._pending: list[MediaPacket] = []
        self._parameter_sets = b""
        self._offset = 0  # pts added on each loop of a file (video time base)
        self._loop_span = 0
        self._clock_start: float | None = None
        self._first_pts: int | None = None
        self._video_tb = Fraction(1, 90_000)
        self._codec = "h264"

    def open(self) -> StreamInfo:
        deadline = time.monotonic() + self._open_deadline if self._open_deadline else None
        url = self._url if self._login is None else self._login(self._open_deadline or 60.0)
        try:
            container = self._first_open(url, deadline)
            video = container.streams.video[0] if container.streams.video else None
            if video is not None and not video.codec_context.width:
                container.close()
                container = self._open_container(url, self._options, deadline)
                video = container.streams.video[0] if container.streams.video else None
        except (av.error.FFmpegError, OSError) as exc:
            if self._diagnose is not None and not isinstance(exc, av.error.HTTPError):
                self._diagnose(self._open_deadline or 60.0)
            raise SourceError(describe_error(exc)) from None
        except SourceError:
            if self._diagnose is not None:  # the deadline: junk after RTSP, or no RTSP at all?
                self._diagnose(self._open_deadline or 60.0)
            raise
        if video is None:
            container.close()
            raise SourceError("the source has no video stream")
        self._container = container
        ctx = video.codec_context
        codec = video.codec_context.name
        extradata: bytes = ctx.extradata or b""
        annexb = extradata.startswith(b"\x00")
        if codec in ("h264", "hevc") and ctx.extradata and not annexb:
            # MP4-style length-prefixed units (a recording): to Annex-B, parameter sets
            # in-band before every keyframe
            self._bsf = av.bitstream.BitStreamFilterContext(f"{codec}_mp4toannexb", video)
        self._codec = codec
        if codec == "h264":
            self._parameter_sets = annexb_parameter_sets(ctx.extradata)
        else:  # hvcC is not avcC: only Annex-B extradata (an RTSP camera's SDP) is taken
            self._parameter_sets = extradata if annexb else b""
        self._video_tb = Fraction(video.time_base or Fraction(1, 90_000))
        audio_info = None
        streams: list[Any] = [video]
        if container.streams.audio and self._audio_mode != "off":
            a = container.streams.audio[0]
            self._audio = AudioPath.for_stream(a, self._audio_mode)
            if self._audio is not None:
                streams.append(a)
                audio_info = AudioInfo(a.codec_context.name, a.codec_context.sample_rate,
                                       a.codec_context.channels)
        self._streams = streams
        self._packets = container.demux(streams)
        fps = float(video.average_rate) if video.average_rate else None
        return StreamInfo(codec, ctx.width, ctx.height, fps, self._parameter_sets, audio_info)

    def _first_open(self, url: str, deadline: float | None) -> Any:
        try:
            return self._open_container(url, {**self._options, **FAST_OPEN}, deadline)
        except av.error.HTTPServerError:
            if self._login is None:
                raise
            # The login's DESCRIBE (no credentials) made an open camera prepare its stream
            # and then saw the connection close; GStreamer-based servers answer the next
            # DESCRIBE 503 while they tear that down (docs/field-notes.md).
            time.sleep(SETTLE_AFTER_LOGIN)
            return self._open_container(url, {**self._options, **FAST_OPEN}, deadline)

    def _open_container(self, url: str, options: dict[str, str], deadline: float | None) -> Any:
        """``av.open`` bounded by what is left of ``deadline``.

        A camera that keeps sending bytes that never make an answer holds FFmpeg's socket
        timeout off forever. PyAV's ``timeout`` is an interrupt callback FFmpeg polls in its
        I/O loops; with no read timeout it returns at once, without the GIL, while streaming,
        so it costs nothing after the open. It applies to FFmpeg's open and to its stream
        probe, one after the other: each gets half of what is left.
        """
        if deadline is None:
            return av.open(url, options=options)
        budget = max((deadline - time.monotonic()) / 2, 0.05)
        started = time.monotonic()
        try:
            return av.open(url, options=options, timeout=(budget, None))
        except av.error.FFmpegError:
            # FFmpeg's RTSP code reports the interrupt as whatever it was reading (often
            # InvalidDataError): past the budget, the deadline is the reason.
            if time.monotonic() - started >= budget * 0.95:
                raise SourceError(undelivered(self._open_deadline or 0)) from None
            raise

    def read(self) -> MediaPacket:
        while not self._pending:
            self._pending = self._next_packets()
        out = self._pending.pop(0)
        if self._realtime and out.video:
            self._pace(out)
        return out

    def _next_packets(self) -> list[MediaPacket]:
        assert self._packets is not None
        try:
            packet = next(self._packets)
        except StopIteration:
            if not self._loop:
                raise SourceError("the stream ended") from None
            self._rewind()
            return []
        except av.error.FFmpegError as exc:
            raise SourceError(describe_error(exc)) from None
        if packet.pts is None or packet.size == 0:
            return []  # RTSP's first packet has no pts; flush packets are empty (field-notes)
        if packet.stream.type == "audio":
            return self._audio.convert(packet) if self._audio else []
        if self._bsf is not None:
            return [self._video(p) for p in self._bsf.filter(packet) if p.pts is not None]
        return [self._video(packet)]

    def _video(self, packet: Any) -> MediaPacket:
        data = bytes(packet)
        if packet.is_keyframe and self._codec == "h264":
            data = with_parameter_sets(data, self._parameter_sets)
        pts = int(packet.pts) + self._offset
        self._loop_span = max(self._loop_span, int(packet.pts) + int(packet.duration or 0))
        return MediaPacket(True, data, pts, self._video_tb, bool(packet.is_keyframe))

    def _rewind(self) -> None:
        assert self._container is not None
        self._container.seek(0)
        self._packets = self._container.demux(self._streams)
        self._offset += self._loop_span
        self._loop_span = 0

    def _pace(self, packet: MediaPacket) -> None:
        """Files play in real time: wait until this packet's moment has come."""
        now = time.monotonic()
        if self._clock_start is None or self._first_pts is None:
            self._clock_start, self._first_pts = now, packet.pts
            return
        due = self._clock_start + float((packet.pts - self._first_pts) * packet.time_base)
        if due > now:
            time.sleep(min(due - now, 1.0))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def rtsp_source(
    url: str, *, transport: str, timeout: float, username: str | None, password: str | None,
    audio_mode: str, camera_id: str = "", rule: str = "auto",
) -> PyAVSource:
    """An RTSP camera. Its credentials reach FFmpeg only through :mod:`rtsp_login` (the
    camera's challenge checked first); the whole open is bounded by ``OPEN_DEADLINE`` times
    the socket timeout."""
    options = {"rtsp_transport": transport, "timeout": str(int(timeout * 1_000_000))}
    try:
        target = rtsp.target(url, username, password)  # credentials in the URL, or apart
    except ValueError as exc:
        raise SourceError(f"cameras[].source: {exc}") from None
    clean = target.url
    deadline = timeout * OPEN_DEADLINE
    if target.username:
        user, secret = target.username, target.password or ""

        def login(budget: float) -> str:
            return rtsp_login.login_url(camera_id, clean, user, secret, rule,
                                        min(timeout, budget))
        return PyAVSource(clean, options, audio_mode=audio_mode, open_deadline=deadline,
                          login=login)

    def diagnose(budget: float) -> None:
        # No credentials to protect: no question first (no extra connection when all is
        # well); after a failure, OPTIONS alone names a silent or a non-RTSP port.
        rtsp_login.ask(clean, min(timeout, budget), describe=False)

    return PyAVSource(clean, options, audio_mode=audio_mode, open_deadline=deadline,
                      diagnose=diagnose)


def file_source(url: str, audio_mode: str) -> PyAVSource:
    path = Path(urlsplit(url).path)
    if not path.is_file():
        raise SourceError(f"no such file: {path}")
    return PyAVSource(str(path), {}, audio_mode=audio_mode, realtime=True, loop=True)
