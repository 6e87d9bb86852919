"""The agent's own RTSP client for cameras pulled over TCP (RFC 2326, RTP interleaved).

FFmpeg's RTSP demuxer reads each interleaved RTP packet with its own poll and two reads and
builds a packet object per read; at 1080p30 4 Mbit/s that was about 1.1 % of a core per
camera here. This client reads whatever the socket holds in one call (a camera sends a
frame's packets as one burst: about one read per frame) and depacketizes in place
(:mod:`agent.media.depacketize`), for about half of that (docs/field-notes.md, "The
camera pull"). It is blocking and runs in the camera's pull thread, as every source does.

The password never meets a challenge the rule refuses: the camera's ``WWW-Authenticate``
is read on this very connection and answered only as :func:`rtsp_login.send_credentials`
allows (Digest, or Basic where the rule lets it), so no second connection can be answered
differently. UDP transport and ``rtsps://`` stay with FFmpeg (:mod:`.pyav`).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urljoin

from agent.errors import SourceError
from agent.media import depacketize, rtsp
from agent.media.depacketize import parse_rtp
from agent.media.rtp import split_annexb
from agent.media.sources import OPEN_DEADLINE, rtsp_login, undelivered
from agent.media.stream import (
    AudioInfo,
    MediaPacket,
    StreamInfo,
    with_parameter_sets,
)

#: Bytes asked of the socket per read: a whole 1080p keyframe burst fits in a few reads.
READ_SIZE = 256 * 1024
#: A camera's session timeout when it names none (RFC 2326 §12.37).
DEFAULT_SESSION_TIMEOUT = 60.0
#: Seconds between receiver reports (RTCP RR) sent to the camera (RFC 3550 §6.2: ≥ 5 s).
REPORT_INTERVAL = 5.0
#: Video access units buffered during the open while the stream's size is not yet known.
OPEN_BACKLOG = 120
_RTP_CLOCK = 90_000
_NOT_STREAM = ("the camera sent data the agent cannot read as an RTSP stream of H.264 (a "
               "non-RTSP port, or a broken stream)")
_STATUS_ERRORS = {
    401: "the camera refused the credentials (401): check username and password",
    403: "the camera refused access (403): check the user's rights on the camera",
    404: "the camera has no stream at this path (404): check the URL path",
}
_SERVER_ERROR = ("the camera answered with a server error (5xx): it may be starting up or "
                 "overloaded, or it refuses more connections")
_AUDIO_CODECS = {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw", "opus": "opus",
                 "mpeg4-generic": "aac"}
#: How an RTSP message starts: a status line, or a request from the camera (RFC 2326 §6).
_MESSAGE_START = re.compile(rb"RTSP/|[A-Z_]{4}[A-Z_ ]").match
#: What :meth:`_Session.next_item` returns when the buffer holds no whole message.
MORE = object()
_STATIC_AUDIO = {0: ("pcm_mulaw", 8000, 1), 8: ("pcm_alaw", 8000, 1)}


@dataclass
class Track:
    """One ``m=`` section of the camera's SDP."""

    kind: str
    payload_type: int
    encoding: str  # lower case RTP encoding name
    clock: int
    channels: int
    control: str
    fmtp: dict[str, str] = field(default_factory=dict)
    framerate: float | None = None  # a=framerate (RFC 8866 §6.8)


class Timeline:
    """RTP timestamps (32 bits, wrapping) → a stream's pts from 0, never wrapping: at 90 kHz
    the RTP clock wraps every 13.3 hours, which an always-on camera reaches."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._last = 0  # extended timestamp of the last packet

    def pts(self, timestamp: int) -> int:
        if self._first is None:
            self._first = self._last = timestamp
        else:  # the signed 32-bit step from the last one (reordering: a small step back)
            self._last += ((timestamp - self._last + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        return self._last - self._first


def parse_sdp(sdp: str, base: str) -> tuple[str, list[Track]]:
    """The session's control URL (for PLAY) and its media sections (first payload type of
    each) with absolute control URLs (RFC 2326 §C.1.1)."""
    session_control = base
    tracks: list[Track] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            parts = line[2:].split()
            pt = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else -1
            static = _STATIC_AUDIO.get(pt)
            tracks.append(Track(parts[0].lower() if parts else "", pt,
                                {0: "pcmu", 8: "pcma"}.get(pt, ""),
                                static[1] if static else _RTP_CLOCK, 1, session_control))
        elif line.startswith("a=control:"):
            url = _control_url(base, line[len("a=control:"):].strip())
            if tracks:
                tracks[-1].control = url
            else:
                session_control = url
        elif tracks and line.startswith("a=rtpmap:"):
            number, _, encoding = line[len("a=rtpmap:"):].partition(" ")
            if number.strip() == str(tracks[-1].payload_type):
                name, _, rest = encoding.strip().partition("/")
                clock, _, channels = rest.partition("/")
                tracks[-1].encoding = name.lower()
                tracks[-1].clock = int(clock) if clock.isdigit() else tracks[-1].clock
                tracks[-1].channels = int(channels) if channels.isdigit() else 1
        elif tracks and line.startswith("a=framerate:"):
            with contextlib.suppress(ValueError):
                rate = float(line[len("a=framerate:"):])
                tracks[-1].framerate = rate if 0 < rate <= 240 else None
        elif tracks and line.startswith("a=fmtp:"):
            number, _, params = line[len("a=fmtp:"):].partition(" ")
            if number.strip() == str(tracks[-1].payload_type):
                for item in params.split(";"):
                    key, eq, value = item.strip().partition("=")
                    if eq:
                        tracks[-1].fmtp[key.strip().lower()] = value.strip()
    return session_control, tracks


#: NAL unit types of parameter sets: H.264 SPS, PPS; H.265 VPS, SPS, PPS.
_PARAMETER_TYPES = {"h264": (7, 8), "hevc": (32, 33, 34)}


def parameter_sets_in(codec: str, annexb: bytes) -> bytes:
    """The parameter sets an access unit carries (Annex-B), for a camera whose SDP has none."""
    wanted = _PARAMETER_TYPES[codec]
    out = []
    for nal in split_annexb(annexb):
        kind = (nal[0] & 0x1F) if codec == "h264" else (nal[0] >> 1) & 0x3F
        if len(nal) > 1 and kind in wanted:
            out.append(b"\x00\x00\x00\x01" + bytes(nal))
    return b"".join(out)


def _control_url(base: str, value: str) -> str:
    if value == "*":
        return base
    if "://" in value:
        return value
    return urljoin(base if base.endswith("/") else base + "/", value)


class _Session:
    """The RTSP conversation on one TCP connection: requests, authentication, framing."""

    def __init__(self, t: rtsp.Target, timeout: float, rule: str, camera_id: str,
                 deadline: float) -> None:
        self.t = t
        self.timeout = timeout
        self.rule = rule
        self.camera_id = camera_id
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.buf = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.cseq = 0
        self.session: str | None = None
        self.challenges: list[rtsp.Challenge] = []
        self.basic = False
        self.nc = 0
        self.public = ""
        self.answered = 0  # RTSP responses read: is it an RTSP server at all?
        self.last_read = time.monotonic()
        self.streaming = False  # PLAY sent: interleaved data is expected from now on
        self.open_deadline = deadline - time.monotonic()

    def connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.t.host, self.t.port),
                                                 timeout=self._remaining())
        except ConnectionRefusedError:
            raise SourceError("connection refused: the camera is not listening on this port") \
                from None
        except TimeoutError:
            raise SourceError(rtsp_login.TIMEOUT) from None
        except OSError as exc:
            raise SourceError(exc.strerror or "the connection to the camera failed") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.pos = 0

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SourceError(undelivered(self.open_deadline) if self.answered
                              else rtsp_login.TIMEOUT)
        return min(left, self.timeout)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- requests --------------------------------------------------------------------------

    def send(self, method: str, url: str, headers: dict[str, str] | None = None) -> None:
        """Write one request (authorized when the camera asked for credentials)."""
        assert self.sock is not None
        self.cseq += 1
        extra = dict(headers or {})
        if self.session is not None:
            extra["Session"] = self.session
        answer = self._authorization(method, url)
        if answer is not None:
            extra["Authorization"] = answer
        self.sock.sendall(rtsp.request(method, url, self.cseq, extra, agent="therelay-agent"))

    def _authorization(self, method: str, url: str) -> str | None:
        if not self.challenges or self.t.username is None:
            return None
        self.nc += 1
        for challenge in self.challenges:
            if challenge.scheme == "digest":
                try:
                    return rtsp.digest_authorization(challenge, method, url, self.t.username,
                                                     self.t.password or "", nc=self.nc)
                except ValueError:
                    continue
        if self.basic:
            return rtsp.basic_authorization(self.t.username, self.t.password or "")
        return None

    def ask(self, method: str, url: str, headers: dict[str, str] | None = None
            ) -> rtsp.Response:
        """A request and its answer; a 401 is answered once with credentials, if allowed."""
        response = self._exchange(method, url, headers)
        if response.status == 401 and self._learn_challenge(response):
            response = self._exchange(method, url, headers, again=True)
        if response.status in _STATUS_ERRORS:
            raise SourceError(_STATUS_ERRORS[response.status])
        if response.status >= 500:
            raise SourceError(_SERVER_ERROR)
        return response

    def _exchange(self, method: str, url: str, headers: dict[str, str] | None,
                  again: bool = False) -> rtsp.Response:
        try:
            self.send(method, url, headers)
            return self._response()
        except ConnectionError:
            if not again:
                raise
            # Many cameras hang up after a 401: the answer goes on a new connection.
            self.close()
            self.connect()
            self.send(method, url, headers)
            return self._response()

    def _learn_challenge(self, response: rtsp.Response) -> bool:
        """Take the camera's challenge; whether credentials can now be sent."""
        if self.t.username is None:
            return False
        challenges = [rtsp.parse_challenge(v) for v in response.all("WWW-Authenticate")]
        challenge = rtsp_login.Challenge(401, frozenset(c.scheme for c in challenges))
        rtsp_login.send_credentials(self.rule, rtsp_login.MEMORY.get(self.camera_id),
                                    challenge, self.t.host)  # raises on a downgrade
        rtsp_login.MEMORY.note(self.camera_id, challenge.scheme)
        if challenges == self.challenges and self.nc:
            return False  # the same challenge refused what we sent: wrong credentials
        self.challenges = challenges
        self.basic = challenge.scheme == "basic"
        self.nc = 0
        return challenge.scheme in ("digest", "basic")

    def _response(self) -> rtsp.Response:
        """The next RTSP response; interleaved data before it (a late packet) is dropped."""
        while True:
            item = self.next_item()
            if isinstance(item, rtsp.Response):
                return item

    # -- framing ---------------------------------------------------------------------------

    def fill(self) -> None:
        """Read what the socket holds (at least one byte); raises on its end or timeout.

        The buffer is immutable ``bytes``, replaced on each read: the views handed out
        (payloads a depacketizer keeps until its access unit is complete) stay valid."""
        assert self.sock is not None
        try:
            self.sock.settimeout(self._remaining() if self.deadline else self.timeout)
            chunk = self.sock.recv(READ_SIZE)
        except TimeoutError:
            raise SourceError(rtsp_login.TIMEOUT) from None
        if not chunk:
            raise ConnectionResetError("the camera closed the connection")
        self._append(chunk)

    def fill_nowait(self) -> bool:
        """Take what a non-blocking socket holds; False if nothing was there."""
        assert self.sock is not None
        try:
            chunk = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        if not chunk:
            raise ConnectionResetError("the camera closed the connection")
        self._append(chunk)
        return True

    def _append(self, chunk: bytes) -> None:
        self.buf = self.buf[self.pos:] + chunk if self.pos < len(self.buf) else chunk
        self.view = memoryview(self.buf)
        self.pos = 0
        self.last_read = time.monotonic()

    def next_item(self, wait: bool = True) -> object:
        """One message from the buffer, reading more as needed (or :data:`MORE` if not
        ``wait``): a response, an interleaved frame (channel, payload view), or None (a
        request from the camera, skipped)."""
        while True:
            buf, pos = self.buf, self.pos
            available = len(buf) - pos
            if available >= 4 and buf[pos] == 0x24:
                end = pos + 4 + ((buf[pos + 2] << 8) | buf[pos + 3])
                if end <= len(buf):
                    if not self.streaming:
                        raise rtsp.RtspProtocolError("interleaved data before PLAY")
                    self.pos = end
                    return buf[pos + 1], self.view[pos + 4:end]
            elif available >= 5:
                if _MESSAGE_START(buf, pos) is None:
                    raise rtsp.RtspProtocolError("not RTSP")
                head_end = buf.find(b"\r\n\r\n", pos)
                if head_end >= 0:
                    done, message = self._message(pos, head_end)
                    if done:
                        return message
                elif available > rtsp.MAX_HEADER:
                    raise rtsp.RtspProtocolError("headers too long")
            if not wait:
                return MORE
            self.fill()

    def _message(self, pos: int, head_end: int) -> tuple[bool, rtsp.Response | None]:
        """A response (or a request from the camera: None) once its body is in."""
        head = self.buf[pos:head_end + 2]
        request = not head.startswith(b"RTSP/")
        if request:  # e.g. GET_PARAMETER or ANNOUNCE from the camera: read and skipped
            head = b"RTSP/1.0 200 OK\r\n" + head.partition(b"\r\n")[2]
        response = rtsp.parse_head(head)
        try:
            length = int(response.header("Content-Length") or 0)
        except ValueError:
            raise rtsp.RtspProtocolError("a Content-Length that is not a number") from None
        if not 0 <= length <= rtsp.MAX_BODY:
            raise rtsp.RtspProtocolError("body too long")
        end = head_end + 4 + length
        if end > len(self.buf):
            return False, None
        response.body = self.buf[head_end + 4:end]
        self.pos = end
        if request:
            return True, None
        self.answered += 1
        return True, response


class NativeRtspSource:
    """An RTSP camera over TCP: H.264 or H.265 video, and G.711, Opus or AAC audio."""

    def __init__(self, target: rtsp.Target, *, timeout: float, audio_mode: str,
                 camera_id: str = "", rule: str = "auto", open_deadline: float) -> None:
        self._t = target
        self._timeout = timeout
        self._audio_mode = audio_mode
        self._camera_id = camera_id
        self._rule = rule
        self._open_deadline = open_deadline
        self._s: _Session | None = None
        self._pending: list[MediaPacket] = []
        self._video: Any = None  # depacketizer
        self._video_channel = 0
        self._audio_channel = -1
        self._audio_depay: depacketize.AacDepacketizer | None = None
        self._audio_path: Any = None
        self._audio_tb = Fraction(1, 8000)
        self._audio_time = Timeline()
        self._video_time = Timeline()
        self._codec = "h264"
        self._parameter_sets = b""
        self._video_tb = Fraction(1, _RTP_CLOCK)
        self._session_timeout = DEFAULT_SESSION_TIMEOUT
        self._keepalive_at = 0.0
        self._report_at = 0.0
        self._keepalive_method = "OPTIONS"
        self._control = target.url
        self._ssrc = secrets.randbits(32)
        self._camera_ssrc: int | None = None
        self._last_sr = 0
        self._last_sr_at = 0.0
        self._highest = 0  # the video's last sequence number, for receiver reports

    def open(self) -> StreamInfo:
        deadline = time.monotonic() + self._open_deadline
        s = self._s = _Session(self._t, self._timeout, self._rule, self._camera_id, deadline)
        try:
            return self._open(s)
        except rtsp.RtspProtocolError:
            raise SourceError(undelivered(self._open_deadline) if s.answered
                              else rtsp_login.NOT_RTSP) from None
        except ConnectionError:
            raise SourceError("the camera closed the stream") from None
        except OSError as exc:
            raise SourceError(exc.strerror or "the connection to the camera failed") from None

    def _open(self, s: _Session) -> StreamInfo:
        s.connect()
        options = s.ask("OPTIONS", self._t.url)
        s.public = (options.header("Public") or "").upper()
        if "GET_PARAMETER" in s.public:
            self._keepalive_method = "GET_PARAMETER"
        described = s.ask("DESCRIBE", self._t.url, {"Accept": "application/sdp"})
        if described.status != 200:
            raise SourceError(f"the camera answered DESCRIBE with {described.status} "
                              f"{described.reason}".strip())
        base = (described.header("Content-Base") or described.header("Content-Location")
                or self._t.url)
        control, tracks = parse_sdp(described.body.decode("utf-8", "replace"), base)
        video = next((t for t in tracks if t.kind == "video"), None)
        if video is None:
            raise SourceError("the source has no video stream")
        codec = {"h264": "h264", "h265": "hevc"}.get(video.encoding, video.encoding or "unknown")
        if codec not in ("h264", "hevc"):
            return StreamInfo(codec, 0, 0, None, b"")
        self._codec = codec
        self._parameter_sets = depacketize.parameter_sets_from_fmtp(codec, video.fmtp)
        self._video = depacketize.video_depacketizer(codec)
        self._video_tb = Fraction(1, video.clock or _RTP_CLOCK)
        self._video_channel = self._setup(s, video, 0)
        audio = self._pick_audio(tracks)
        audio_info = None
        if audio is not None:
            name = _AUDIO_CODECS[audio.encoding]
            try:
                audio_info = self._audio_for(audio, name)
                self._audio_channel = self._setup(s, audio, 2)
            except (SourceError, ValueError):  # video alone is still a camera
                self._audio_channel, audio_info = -1, None
        self._control = control
        s.streaming = True
        response = s.ask("PLAY", control)
        if response.status != 200:
            raise SourceError(f"the camera refused to play ({response.status} "
                              f"{response.reason})".strip())
        now = time.monotonic()
        self._keepalive_at = now + self._session_timeout / 2
        self._report_at = now + REPORT_INTERVAL
        size = self._size()
        while size is None:  # the size is in the first SPS: read until one came
            if len(self._pending) > OPEN_BACKLOG:
                raise SourceError("the camera sent no H.264/H.265 parameter sets: its stream "
                                  "cannot be played")
            self._pending.extend(self._next_packets(wait=True))
            size = self._size()
        width, height = size
        s.deadline = 0.0  # streaming: each read gets the socket timeout
        return StreamInfo(codec, width, height, video.framerate, self._parameter_sets,
                          audio_info)

    def _pick_audio(self, tracks: list[Track]) -> Track | None:
        if self._audio_mode == "off":
            return None
        for t in tracks:
            if t.kind != "audio" or t.encoding not in _AUDIO_CODECS:
                continue
            if t.encoding == "mpeg4-generic" and (
                    self._audio_mode != "auto" or t.fmtp.get("mode", "").lower() != "aac-hbr"):
                continue
            return t
        return None

    def _audio_for(self, track: Track, name: str) -> AudioInfo:
        from agent.media.audio import AudioPath  # noqa: PLC0415 (PyAV only for AAC)

        self._audio_tb = Fraction(1, track.clock or 8000)
        if name == "aac":
            extradata = depacketize.aac_extradata(track.fmtp)
            config = depacketize.aac_config(extradata)  # BitstreamError, ValueError: no sound
            self._audio_depay = depacketize.AacDepacketizer(track.fmtp)
            self._audio_path = AudioPath.for_codec("aac", self._audio_mode, extradata)
            return AudioInfo("aac", config.sample_rate, config.channels or track.channels)
        return AudioInfo(name, track.clock, track.channels)

    def _setup(self, s: _Session, track: Track, channel: int) -> int:
        transport = f"RTP/AVP/TCP;unicast;interleaved={channel}-{channel + 1}"
        response = s.ask("SETUP", track.control, {"Transport": transport})
        if response.status == 461:
            raise SourceError("the camera does not send RTP over TCP: set the camera's "
                              "transport to udp")
        if response.status != 200:
            raise SourceError(f"the camera refused SETUP ({response.status} "
                              f"{response.reason})".strip())
        if s.session is None:
            value = response.header("Session")
            if not value:
                raise rtsp.RtspProtocolError("SETUP answered without a session")
            session, _, params = value.partition(";")
            s.session = session.strip()
            for param in params.split(";"):
                key, _, number = param.strip().partition("=")
                if key.lower() == "timeout":
                    with contextlib.suppress(ValueError):
                        self._session_timeout = max(float(number), 2.0)
        answered = response.header("Transport") or ""
        for part in answered.split(";"):
            key, _, value = part.strip().partition("=")
            if key.lower() == "interleaved":
                first = value.partition("-")[0]
                if first.isdigit():
                    return int(first)
        return channel

    def _size(self) -> tuple[int, int] | None:
        return depacketize.video_size(self._codec, self._parameter_sets)

    # -- streaming -------------------------------------------------------------------------

    def read(self) -> MediaPacket:
        while not self._pending:
            with _stream_errors():
                self._pending = self._next_packets(wait=True)
        return self._pending.pop(0)

    # -- streaming on the event loop (see CameraHub: one wake-up per burst, no thread) -----

    @property
    def loop_ready(self) -> bool:
        """Whether the stream can be read on the event loop: every packet is cheap to
        handle there (no AAC to transcode, which stays in the pull thread)."""
        return self._audio_depay is None

    def fileno(self) -> int:
        """The camera's socket, made non-blocking: the loop reads it when it is readable."""
        assert self._s is not None and self._s.sock is not None
        self._s.sock.setblocking(False)
        return self._s.sock.fileno()

    def read_available(self, drain: bool = False) -> list[MediaPacket]:
        """What the camera sent since the last call (and what the open buffered), without
        waiting: one read, or with ``drain`` all the socket holds; raises SourceError when
        the stream has ended or broken."""
        out, self._pending = self._pending, []
        try:  # not _stream_errors(): a context manager costs five calls, on every read
            while self._s is not None and self._s.fill_nowait():
                out += self._next_packets(wait=False)
                if not drain:
                    break
        except (rtsp.RtspProtocolError, OSError) as exc:
            raise _stream_error(exc) from None
        return out

    def silent_for(self) -> float:
        """Seconds since the camera last sent anything."""
        return time.monotonic() - self._s.last_read if self._s is not None else 0.0

    def _next_packets(self, wait: bool) -> list[MediaPacket]:
        s = self._s
        assert s is not None
        out: list[MediaPacket] = []
        item = s.next_item(wait)
        while item is not MORE:
            if type(item) is tuple:
                channel, view = item
                if channel == self._video_channel:
                    rtp = parse_rtp(view)
                    if rtp is not None:
                        self._highest = rtp[2]
                        for unit in self._video.push(rtp[4], rtp[3], rtp[1], rtp[2]):
                            out.append(self._video_packet(unit))
                elif channel == self._audio_channel:
                    out.extend(self._audio(view))
                elif channel == self._video_channel + 1:
                    self._rtcp(view)
            elif isinstance(item, rtsp.Response) and item.status in (454, 455, 459):
                raise SourceError(f"the camera ended the session ({item.status} {item.reason})")
            item = s.next_item(wait=False)  # what the last read brought, then back
        self._timers(s)
        return out

    def _video_packet(self, unit: depacketize.AccessUnit) -> MediaPacket:
        data = unit.data
        if unit.keyframe:
            if self._size() is None:  # not in the SDP: the keyframe's own, if it has them
                self._parameter_sets = parameter_sets_in(self._codec, data)
            if self._codec == "h264":
                data = with_parameter_sets(data, self._parameter_sets)
        return MediaPacket(True, data, self._video_time.pts(unit.timestamp), self._video_tb,
                           unit.keyframe, nals=() if unit.keyframe else unit.nals)

    def _audio(self, view: memoryview) -> list[MediaPacket]:
        rtp = parse_rtp(view)
        if rtp is None:
            return []
        _, marker, sequence, timestamp, payload = rtp
        if self._audio_depay is None:  # G.711, Opus: as they come
            return [MediaPacket(False, bytes(payload), self._audio_time.pts(timestamp),
                                self._audio_tb, False)]
        out: list[MediaPacket] = []
        for frame in self._audio_depay.push(payload, timestamp, marker, sequence):
            out.extend(self._audio_path.convert_bytes(
                frame.data, self._audio_time.pts(frame.timestamp), self._audio_tb))
        return out

    def _rtcp(self, view: memoryview) -> None:
        """Remember the camera's last sender report, for our receiver reports."""
        if len(view) >= 20 and view[1] == 200:  # SR
            self._camera_ssrc, ntp_mid = struct.unpack_from("!I4xI", view, 4)
            self._last_sr = ntp_mid & 0xFFFFFFFF
            self._last_sr_at = time.monotonic()

    def _timers(self, s: _Session) -> None:
        now = time.monotonic()
        if now >= self._report_at:
            self._report_at = now + REPORT_INTERVAL
            self._send_report(s, now)
        if now >= self._keepalive_at:
            self._keepalive_at = now + self._session_timeout / 2
            s.send(self._keepalive_method, self._control)  # a few hundred bytes: never blocks

    def _send_report(self, s: _Session, now: float) -> None:
        """An RTCP receiver report over the video's RTCP channel (RFC 3550 §6.4.2)."""
        assert s.sock is not None
        if self._camera_ssrc is None:
            return
        dlsr = int((now - self._last_sr_at) * 65536) if self._last_sr else 0
        report = struct.pack("!BBHII4xIIII", 0x81, 201, 7, self._ssrc, self._camera_ssrc,
                             self._highest, 0, self._last_sr, dlsr & 0xFFFFFFFF)
        s.sock.sendall(struct.pack("!BBH", 0x24, self._video_channel + 1, len(report)) + report)

    def close(self) -> None:
        s = self._s
        if s is None or s.sock is None:
            return
        if s.session is not None:
            try:
                s.sock.settimeout(0.5)
                s.send("TEARDOWN", self._control)
            except OSError:
                pass  # gone already: nothing to tear down
        s.close()


def _stream_error(exc: rtsp.RtspProtocolError | OSError) -> SourceError:
    """What broke a running stream, in the installer's words."""
    if isinstance(exc, rtsp.RtspProtocolError):
        return SourceError(_NOT_STREAM)
    if isinstance(exc, ConnectionError):
        return SourceError("the camera closed the stream")
    return SourceError(exc.strerror or "the connection to the camera failed")


@contextlib.contextmanager
def _stream_errors() -> Iterator[None]:
    """What breaks a running stream, in the installer's words."""
    try:
        yield
    except (rtsp.RtspProtocolError, OSError) as exc:
        raise _stream_error(exc) from None


def native_source(url: str, *, timeout: float, username: str | None, password: str | None,
                  audio_mode: str, camera_id: str = "", rule: str = "auto") -> NativeRtspSource:
    """An ``rtsp://`` camera over TCP; its whole open bounded as FFmpeg's is (pyav)."""
    try:
        target = rtsp.target(url, username, password)  # credentials in the URL, or apart
    except ValueError as exc:
        raise SourceError(f"cameras[].source: {exc}") from None
    return NativeRtspSource(target, timeout=timeout, audio_mode=audio_mode,
                            camera_id=camera_id, rule=rule,
                            open_deadline=timeout * OPEN_DEADLINE)
