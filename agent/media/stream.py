"""What flows through the hub: stream descriptions and packets, plus H.264/H.265 byte helpers
(parameter sets, emulation prevention, an Exp-Golomb bit reader)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from agent.media.rtp import Payload

START_CODE = b"\x00\x00\x00\x01"
NAL_SPS = 7
#: H.264 profile_idc values whose SPS carries chroma_format_idc, bit depths and scaling lists
#: (H.264 7.3.2.1.1).
H264_HIGH_PROFILES = frozenset({100, 110, 122, 144, 244, 44, 83, 86, 118, 128, 138, 139, 134,
                                135})

#: WebRTC in this agent carries these: H.264 to every viewer, H.265 to viewers whose offer has
#: H265 (agent/webrtc/h265.py); anything else is refused with a clear error.
VIDEO_CODECS = ("h264", "hevc")
#: The hub pulls these: RTSP clients take both.
PULLED_CODECS = ("h264", "hevc")
PASSTHROUGH_AUDIO = {"pcm_mulaw": "PCMU", "pcm_alaw": "PCMA", "opus": "opus"}


@dataclass(frozen=True, slots=True)
class AudioInfo:
    codec: str  # FFmpeg name: pcm_mulaw, pcm_alaw, opus, aac, …
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A camera's streams as the source opened them."""

    codec: str  # FFmpeg name of the video codec: h264, hevc, …
    width: int
    height: int
    fps: float | None
    #: SPS/PPS in Annex-B form (from the SDP or the container), injected before keyframes.
    parameter_sets: bytes
    audio: AudioInfo | None = None


class MediaPacket(NamedTuple):
    """One encoded video access unit or audio frame. ``data`` is Annex-B for H.264."""

    video: bool
    data: bytes
    pts: int
    time_base: Fraction
    keyframe: bool
    #: Its RTP payloads, made once per camera by the hub while an RTP consumer wants them.
    rtp: tuple[Payload, ...] | None = None
    #: Where each NAL unit's start code (4 bytes) begins in ``data``, when the source knows
    #: (the agent's RTSP client writes them); empty: the packetizer looks for them.
    nals: tuple[int, ...] = ()


def annexb_parameter_sets(extradata: bytes | None) -> bytes:
    """SPS/PPS from codec extradata, which is Annex-B (RTSP) or avcC (MP4) → Annex-B."""
    if not extradata:
        return b""
    if extradata.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")):
        return extradata
    if extradata[0] != 1 or len(extradata) < 7:  # not avcC either
        return b""
    out, pos = [], 6
    count = extradata[5] & 0x1F  # SPS count
    for kind in ("sps", "pps"):
        for _ in range(count):
            size = int.from_bytes(extradata[pos:pos + 2], "big")
            out.append(START_CODE + extradata[pos + 2:pos + 2 + size])
            pos += 2 + size
        if kind == "sps" and pos < len(extradata):
            count = extradata[pos]
            pos += 1
    return b"".join(out)


def nal_types(data: bytes, limit: int = 8) -> set[int]:
    """Types of the first ``limit`` NAL units of an Annex-B access unit."""
    types: set[int] = set()
    pos = 0
    for _ in range(limit):
        pos = data.find(b"\x00\x00\x01", pos)
        if pos < 0 or pos + 3 >= len(data):
            break
        types.add(data[pos + 3] & 0x1F)
        pos += 3
    return types


def with_parameter_sets(data: bytes, parameter_sets: bytes) -> bytes:
    """Prepend SPS/PPS to a keyframe that lacks them (cameras that send them only in SDP)."""
    if not parameter_sets or NAL_SPS in nal_types(data):
        return data
    return parameter_sets + data


def rbsp(nal: bytes) -> bytes:
    """A NAL unit's bytes with the emulation prevention bytes (00 00 03) removed (H.264 and
    H.265 §7.4.1/7.4.2): what an SPS parser reads."""
    if b"\x00\x00\x03" not in nal:
        return nal
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class BitstreamError(ValueError):
    """A parameter set that ends early or holds an invalid or out-of-range value."""


class BitReader:
    """An MSB-first bit reader with Exp-Golomb codes (H.264/H.265 §9.1) over RBSP bytes;
    running past the end raises :class:`BitstreamError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.position = 0  # bits read

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.position >> 3
            if byte >= len(self._data):
                raise BitstreamError("the parameter set ends early")
            value = (value << 1) | ((self._data[byte] >> (7 - (self.position & 7))) & 1)
            self.position += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise BitstreamError("the parameter set holds an invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) >> 1 if code & 1 else -(code >> 1)
