"""The per-camera RTP packetizer: each access unit becomes RTP payloads once, for every consumer.

Payloads are shared and immutable: a :class:`Payload` is a small prefix (an FU or aggregation
header) plus a zero-copy ``memoryview`` of the camera's access unit. Every consumer (an RTSP
client today, WebRTC viewers later) adds only its own 12-byte RTP header — SSRC, sequence
number, its timestamp, payload type — and the payload's marker bit.

The codec-specific part sits behind :class:`Packetizer` (``packetize(packet) -> payloads``);
the hub and the fan-out never change per codec. Video: H.264 (RFC 6184) and H.265 (RFC 7798),
single NAL unit packets, parameter sets aggregated on every keyframe (STAP-A / AP), large NAL
units fragmented (FU-A / FU). Audio: one payload per frame (G.711 and Opus as they are; AAC
per RFC 3640 ``mpeg4-generic`` AAC-hbr).
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Protocol

from agent.media.stream import MediaPacket, StreamInfo

#: Bytes of RTP payload per packet: 1200 leaves room for the RTP header (12), SRTP's tag (10),
#: IPv6 + UDP (48) and a tunnel on a 1280-1500 byte path MTU.
PAYLOAD_SIZE = 1200

#: The fixed RTP header (RFC 3550 §5.1) each consumer puts before a shared payload: V/P/X/CC,
#: M/PT, sequence number, timestamp, SSRC.
RTP_HEADER = struct.Struct("!BBHII")
RTP_VERSION = 0x80  # V=2, no padding, no extension, no CSRC
#: The largest payload one RTP packet can carry anywhere we send it: a UDP datagram holds
#: 65,507 bytes, less the RTP header and SRTP's tag and room for an RTX prefix.
MAX_PAYLOAD = 65_000

# RFC 6184 §5.2 NAL unit types used by the payload format
H264_SPS, H264_PPS, H264_AUD = 7, 8, 9
H264_STAP_A, H264_FU_A = 24, 28
# RFC 7798 §1.1.4 / H.265 Table 7-1
H265_VPS, H265_SPS, H265_PPS, H265_AUD = 32, 33, 34, 35
H265_AP, H265_FU = 48, 49


class Payload(NamedTuple):
    """One RTP payload: ``prefix + body``; ``marker`` set on an access unit's last packet;
    ``size`` their length (counted once per camera, not once per consumer)."""

    prefix: bytes
    body: memoryview | bytes
    marker: bool
    size: int


class Packetizer(Protocol):
    """Turns one hub packet into its RTP payloads (same order as they are to be sent)."""

    def packetize(self, packet: MediaPacket) -> tuple[Payload, ...]: ...


def split_annexb(data: bytes) -> list[memoryview]:
    """The NAL units of an Annex-B access unit, as views (no copy), start codes removed."""
    view = memoryview(data)
    nals: list[memoryview] = []
    start = data.find(b"\x00\x00\x01")
    if start < 0:
        return [view] if data else []
    start += 3
    while True:
        nxt = data.find(b"\x00\x00\x01", start)
        end = len(data) if nxt < 0 else nxt
        while nxt >= 0 and end > start and data[end - 1] == 0:
            end -= 1  # a 4-byte start code's zero, or trailing_zero_8bits, is not the NAL's
        if end > start:
            nals.append(view[start:end])
        if nxt < 0:
            return nals
        start = nxt + 3


def _units_at(data: bytes, starts: tuple[int, ...]) -> list[memoryview]:
    """The NAL units of an access unit whose 4-byte start codes begin at ``starts``."""
    view = memoryview(data)
    return [view[start + 4:end] for start, end in zip(starts, (*starts[1:], len(data)),
                                                      strict=True)]


_new = tuple.__new__  # a Payload without NamedTuple's Python-level __new__ (once a packet)


class _NalPacketizer:
    """What H.264 and H.265 share: single NAL, aggregation of parameter sets, fragmentation."""

    header_size = 1  # bytes of NAL unit header
    min_aggregated = 1  # fewer parameter sets than this go as single NAL unit packets
    parameter_types: tuple[int, ...] = ()
    dropped_types: tuple[int, ...] = ()

    def __init__(self, parameter_sets: bytes, payload_size: int = PAYLOAD_SIZE) -> None:
        self.size = payload_size
        # the NAL unit type of each possible first byte: a lookup, not a call, per unit
        self._types = tuple(self.nal_type(bytes((b, 0))) for b in range(256))
        self._stored = {self.nal_type(n): bytes(n) for n in split_annexb(parameter_sets)
                        if self.nal_type(n) in self.parameter_types}

    def nal_type(self, nal: memoryview | bytes) -> int:
        raise NotImplementedError

    def aggregate(self, nals: list[bytes]) -> bytes:
        raise NotImplementedError

    def fu_header(self, nal: memoryview) -> bytes:
        """The payload header of the unit's fragmentation units (FU indicator, RFC 6184
        §5.8; PayloadHdr, RFC 7798 §4.4.3); the FU header byte follows it."""
        raise NotImplementedError

    def fragments(self, nal: memoryview, out: list[Payload]) -> None:
        """The unit in fragmentation units, appended to ``out``: its own header is not
        carried (the FU header's type and the payload header stand for it)."""
        head = self.fu_header(nal)
        kind = self._types[nal[0]]
        skip, end = self.header_size, len(nal)
        overhead = len(head) + 1
        step = self.size - overhead
        last = end - step  # a fragment starting here or later is the last (E bit)
        first, middle = head + bytes((0x80 | kind,)), head + bytes((kind,))
        append = out.append
        for pos in range(skip, end, step):
            if pos < last:
                append(_new(Payload, (first if pos == skip else middle, nal[pos:pos + step],
                                      False, overhead + step)))
            else:
                flags = (0x80 if pos == skip else 0) | 0x40 | kind
                append(_new(Payload, (head + bytes((flags,)), nal[pos:], False,
                                      overhead + end - pos)))

    def parameter_sets(self, nals: list[memoryview]) -> list[bytes]:
        """The access unit's own parameter sets, else the stored ones (learnt or from SDP)."""
        for n in nals:
            kind = self._types[n[0]]
            if kind in self.parameter_types:
                self._stored[kind] = bytes(n)
        return [self._stored[k] for k in self.parameter_types if k in self._stored]

    def packetize(self, packet: MediaPacket) -> tuple[Payload, ...]:
        types, dropped, header_size = self._types, self.dropped_types, self.header_size
        nals = [n for n in (_units_at(packet.data, packet.nals) if packet.nals
                            else split_annexb(packet.data))
                if len(n) > header_size and types[n[0]] not in dropped]
        out: list[Payload] = []
        if packet.keyframe:
            params = self.parameter_sets(nals)
            nals = [n for n in nals if types[n[0]] not in self.parameter_types]
            if (len(params) >= self.min_aggregated
                    and sum(len(p) + 2 for p in params) + header_size <= self.size):
                aggregated = self.aggregate(params)
                out.append(_new(Payload, (aggregated, b"", False, len(aggregated))))
            else:  # too big (or too few) to aggregate: sent ahead as ordinary units
                nals = [memoryview(p) for p in params] + nals
        size = self.size
        for nal in nals:
            n = len(nal)
            if n <= size:
                out.append(_new(Payload, (b"", nal, False, n)))
            else:
                self.fragments(nal, out)
        if out:  # the marker: on the access unit's last packet
            prefix, body, _, n = out[-1]
            out[-1] = _new(Payload, (prefix, body, True, n))
        return tuple(out)


class H264Packetizer(_NalPacketizer):
    """RFC 6184, packetization-mode=1: single NAL unit, STAP-A (§5.7.1), FU-A (§5.8)."""

    header_size = 1
    parameter_types = (H264_SPS, H264_PPS)
    dropped_types = (H264_AUD,)  # access unit delimiters are optional and only cost bytes

    def nal_type(self, nal: memoryview | bytes) -> int:
        return nal[0] & 0x1F

    def aggregate(self, nals: list[bytes]) -> bytes:
        nri = max(n[0] & 0x60 for n in nals)  # §5.7: the highest NRI of the aggregated units
        return bytes([nri | H264_STAP_A]) + b"".join(
            struct.pack("!H", len(n)) + n for n in nals)

    def fu_header(self, nal: memoryview) -> bytes:
        return bytes(((nal[0] & 0xE0) | H264_FU_A,))  # F and NRI of the unit, type 28


class H265Packetizer(_NalPacketizer):
    """RFC 7798: single NAL unit (§4.4.1), AP (§4.4.2), FU (§4.4.3); no DONL fields
    (sprop-max-don-diff is 0: units are sent in decoding order)."""

    header_size = 2
    min_aggregated = 2  # §4.4.2: an AP carries two or more aggregation units
    parameter_types = (H265_VPS, H265_SPS, H265_PPS)
    dropped_types = (H265_AUD,)

    def nal_type(self, nal: memoryview | bytes) -> int:
        return (nal[0] >> 1) & 0x3F

    def aggregate(self, nals: list[bytes]) -> bytes:
        # §4.4.2: F is the OR of the units' F bits, LayerId and TID the lowest of theirs
        f = max(n[0] & 0x80 for n in nals)
        layer = min(((n[0] & 1) << 5) | (n[1] >> 3) for n in nals)
        tid = min(n[1] & 0x07 for n in nals)
        header = bytes([f | (H265_AP << 1) | (layer >> 5), ((layer & 0x1F) << 3) | tid])
        return header + b"".join(struct.pack("!H", len(n)) + n for n in nals)

    def fu_header(self, nal: memoryview) -> bytes:
        return bytes(((nal[0] & 0x81) | (H265_FU << 1), nal[1]))  # type 49, same LayerId/TID


class FramePacketizer:
    """Audio whose RTP payload is the frame itself: G.711 (RFC 3551 §4.5.14), Opus (RFC 7587)."""

    def packetize(self, packet: MediaPacket) -> tuple[Payload, ...]:
        if len(packet.data) > MAX_PAYLOAD:
            return ()  # fits no datagram; no camera sends such frames
        return (Payload(b"", packet.data, False, len(packet.data)),)


class AacPacketizer:
    """RFC 3640 §3.3.6 AAC-hbr: a 16-bit AU-headers-length, one AU-header (13-bit size,
    3-bit index), then the raw AAC frame (ADTS header stripped if the source left one)."""

    def packetize(self, packet: MediaPacket) -> tuple[Payload, ...]:
        data = packet.data
        body: memoryview | bytes = data
        if len(data) > 7 and data[0] == 0xFF and (data[1] & 0xF6) == 0xF0:  # ADTS sync word
            body = memoryview(data)[9 if not data[1] & 1 else 7:]
        if len(body) >= 1 << 13:
            return ()  # cannot be described in 13 bits; no camera sends such frames
        return (Payload(struct.pack("!HH", 16, len(body) << 3), body, True, 4 + len(body)),)


def video_packetizer(info: StreamInfo, payload_size: int = PAYLOAD_SIZE) -> Packetizer | None:
    if info.codec == "h264":
        return H264Packetizer(info.parameter_sets, payload_size)
    if info.codec == "hevc":
        return H265Packetizer(info.parameter_sets, payload_size)
    return None


def audio_packetizer(codec: str) -> Packetizer | None:
    """For audio as the hub delivers it (after the audio path): its RTP encoding name."""
    if codec in ("PCMU", "PCMA", "opus"):
        return FramePacketizer()
    if codec == "aac":
        return AacPacketizer()
    return None
