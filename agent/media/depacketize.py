"""RTP payloads from a camera back into access units and audio frames: the I/O-free half of
the native RTSP client (the inverse of :mod:`agent.media.rtp`).

Video: H.264 (RFC 6184: single NAL unit packets, STAP-A, FU-A) and H.265 (RFC 7798: single
NAL unit packets, AP, FU; no DONL fields, i.e. sprop-max-don-diff absent or 0) become Annex-B
access units with 4-byte start codes. An access unit ends with the packet whose marker bit is
set, or, for cameras that never set it, when a packet with another timestamp arrives.

A camera is not trusted: a malformed payload is dropped (never an exception), a fragmented
NAL unit with a lost fragment is dropped whole (never a corrupted one: the rest of its access
unit is kept), and an access unit over ``max_size`` bytes is dropped, so memory stays bounded.
Each depacketizer copies what it keeps into its own buffer: the caller may reuse the buffer
its payload views point into as soon as ``push`` returns.

Audio: AAC in ``mpeg4-generic`` (RFC 3640, AAC-hbr and the other AU-header layouts) becomes
raw AAC frames, each with its RTP timestamp.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from typing import NamedTuple, Protocol

from agent.hls.fmp4 import parse_hevc_sps
from agent.media.rtp import split_annexb
from agent.media.stream import (
    H264_HIGH_PROFILES,
    START_CODE,
    BitReader,
    BitstreamError,
    rbsp,
)

#: The largest access unit kept (bytes, Annex-B); a larger one is dropped whole. A 4K
#: keyframe of a camera at 20 Mbit/s is about 1 MB.
MAX_ACCESS_UNIT = 4 << 20

_RTP = struct.Struct("!BBHI")  # V/P/X/CC, M/PT, sequence number, timestamp


def parse_rtp(packet: memoryview) -> tuple[int, bool, int, int, memoryview] | None:
    """An RTP packet (RFC 3550 §5.1) → ``(payload_type, marker, sequence, timestamp,
    payload)``: the payload is a view of ``packet`` without the CSRC list, the header
    extension and the padding. None when it is not a valid version 2 RTP packet."""
    size = len(packet)
    if size < 12:
        return None
    first, second, sequence, timestamp = _RTP.unpack_from(packet)
    if first & 0xC0 != 0x80:
        return None
    start = 12 + (first & 0x0F) * 4
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in 32-bit words
        if start + 4 > size:
            return None
        start += 4 + ((packet[start + 2] << 8) | packet[start + 3]) * 4
    end = size
    if first & 0x20:  # padding: its last byte counts the padding bytes, itself included
        end -= packet[size - 1]
        if end == size:
            return None
    if start > end:
        return None
    return second & 0x7F, bool(second & 0x80), sequence, timestamp, packet[start:end]


# -- video ----------------------------------------------------------------------------------


class AccessUnit(NamedTuple):
    """One video access unit: Annex-B (4-byte start codes), its RTP timestamp, and whether
    it holds an IDR (H.264) / IRAP (H.265) picture; ``nals``: where each NAL unit's start
    code begins in ``data`` (known as the units are written: nobody need look for them)."""

    data: bytes
    timestamp: int
    keyframe: bool
    nals: tuple[int, ...] = ()


_NOTHING: tuple[AccessUnit, ...] = ()


class VideoDepacketizer(Protocol):
    dropped: int  # NAL units and access units dropped so far

    def push(self, payload: memoryview, timestamp: int, marker: bool,
             sequence: int) -> tuple[AccessUnit, ...]:
        """Take one RTP payload (in sequence order); return the access units it completes:
        usually none or one, two when a packet with a new timestamp ends the previous unit
        and, with its marker bit, its own."""
        ...


class _NalDepacketizer:
    """RFC 6184 and RFC 7798 share their structure: single NAL unit packets, aggregation
    packets (16-bit size, unit, …) and fragmentation units; the codec-specific numbers are
    the subclass's class attributes."""

    header = 1  # bytes of NAL unit header
    shift, mask = 0, 0x1F  # type = (first byte >> shift) & mask
    first_single = 1  # single NAL unit packets: first_single <= type < aggregation
    aggregation = 24
    fragment = 28
    keep = 0xE0  # bits of the payload header's first byte the NAL unit header keeps
    last_vcl = 5  # types up to this one carry slices
    keyframes = (5, 5)  # first and last type of a keyframe's pictures

    def __init__(self, max_size: int = MAX_ACCESS_UNIT) -> None:
        self.max_size = max_size
        #: NAL units, packets and access units dropped (malformed, lost fragments, too large).
        self.dropped = 0
        self._buf = bytearray()
        self._starts: list[int] = []  # where each NAL unit's start code begins in _buf
        self._timestamp = -1  # of the access unit being assembled; -1 when none is
        self._next = -1  # the sequence number expected next
        # Where the NAL unit being reassembled from fragments starts in _buf; -1: none is,
        # -2: one lost a fragment (dropped and counted): its next fragments are skipped.
        self._fu = -1
        self._keyframe = False
        self._vcl = False  # the unit holds a slice (not only parameter sets, SEI…)
        self._oversized = False  # the unit grew past max_size: dropped until it ends
        # the class's numbers as instance attributes and a table: quicker to read in CPython
        self._header, self._fragment = self.header, self.fragment
        self._types = tuple((b >> self.shift) & self.mask for b in range(256))

    def push(self, payload: memoryview, timestamp: int, marker: bool,
             sequence: int) -> tuple[AccessUnit, ...]:
        done = _NOTHING
        if sequence != self._next and self._fu >= 0:  # a lost fragment: drop that NAL unit
            self._cut(self._fu)
            self._fu = -2
            self.dropped += 1
        self._next = (sequence + 1) & 0xFFFF
        if timestamp != self._timestamp:
            if self._timestamp != -1:  # the previous unit never saw its marker
                done = self._finish()
            self._timestamp = timestamp
        if not self._oversized:
            header = self._header
            if (len(payload) > header + 1 and self._types[payload[0]] == self._fragment
                    and not payload[header] & 0xC0 and self._fu >= 0):
                self._buf += payload[header + 1:]  # a middle fragment: most packets
            else:
                self._add(payload)
            if len(self._buf) > self.max_size:
                self._oversized = True
                self._buf = bytearray()
                self._starts.clear()
                self._fu = -1
                self.dropped += 1
        # A marker ends the unit once it has a slice: one on a packet of parameter sets or
        # SEI alone (not conforming) would otherwise cut them off their keyframe.
        if marker and (self._vcl or self._oversized):
            done += self._finish()
        return done

    def _finish(self) -> tuple[AccessUnit, ...]:
        buf = self._buf
        if self._fu >= 0:  # its last fragment never came
            self._cut(self._fu)
            self.dropped += 1
        done = _NOTHING
        if buf and not self._oversized:
            done = (AccessUnit(bytes(buf), self._timestamp, self._keyframe,
                               tuple(self._starts)),)
        buf.clear()
        self._starts.clear()
        self._timestamp = self._fu = -1
        self._keyframe = self._vcl = self._oversized = False
        return done

    def _add(self, payload: memoryview) -> None:
        header = self._header
        if len(payload) <= header:
            self.dropped += 1
            return
        kind = self._types[payload[0]]
        buf = self._buf
        if kind == self._fragment:  # payload header, FU header (S, E, type), fragment
            if len(payload) <= header + 1:
                self.dropped += 1
                return
            flags = payload[header]
            if flags & 0x80:  # S: the NAL unit header is rebuilt from both headers
                if self._fu >= 0:  # the previous fragmented unit never ended
                    self._cut(self._fu)
                    self.dropped += 1
                self._fu = len(buf)
                kind = flags & self.mask
                self._starts.append(len(buf))
                buf += START_CODE
                buf.append((payload[0] & self.keep) | (kind << self.shift))
                buf += payload[1:header]
                self._saw(kind)
            elif self._fu < 0:  # its start was lost
                if flags & 0x40:
                    if self._fu == -1:  # not counted yet
                        self.dropped += 1
                    self._fu = -1
                return
            buf += payload[header + 1:]
            if flags & 0x40:  # E
                self._fu = -1
        elif self.first_single <= kind < self.aggregation:
            self._starts.append(len(buf))
            buf += START_CODE
            buf += payload
            self._saw(kind)
        elif kind == self.aggregation:
            units = self._aggregated(payload)
            if units is None:
                self.dropped += 1
                return
            for unit in units:
                self._saw((unit[0] >> self.shift) & self.mask)
                self._starts.append(len(buf))
                buf += START_CODE
                buf += unit
        else:  # interleaved-mode packets, PACI, reserved types
            self.dropped += 1

    def _cut(self, at: int) -> None:
        """Drop what the buffer holds from ``at`` on (a unit that lost a fragment)."""
        del self._buf[at:]
        starts = self._starts
        while starts and starts[-1] >= at:
            starts.pop()

    def _saw(self, kind: int) -> None:
        if kind <= self.last_vcl:
            self._vcl = True
            first, last = self.keyframes
            if first <= kind <= last:
                self._keyframe = True

    def _aggregated(self, payload: memoryview) -> list[memoryview] | None:
        """The NAL units of an aggregation packet (STAP-A, AP); None if one is shorter
        than a NAL unit header or its size runs past the payload."""
        units = []
        start, end = self.header, len(payload)
        while start < end:
            if start + 2 > end:
                return None
            size = (payload[start] << 8) | payload[start + 1]
            start += 2
            if size < self.header or start + size > end:
                return None
            units.append(payload[start:start + size])
            start += size
        return units or None


class H264Depacketizer(_NalDepacketizer):
    """RFC 6184 packetization modes 0 and 1: single NAL unit (types 1-23), STAP-A (24),
    FU-A (28). STAP-B, MTAP and FU-B (interleaved mode) are dropped. Keyframe: IDR (5)."""


class H265Depacketizer(_NalDepacketizer):
    """RFC 7798 without DONL: single NAL unit (types 0-47), AP (48), FU (49). PACI (50)
    and the unspecified types are dropped. Keyframe: IRAP (16-21)."""

    header = 2
    shift, mask = 1, 0x3F
    first_single = 0
    aggregation = 48
    fragment = 49
    keep = 0x81  # F and the high bit of the layer id; the second byte is copied
    last_vcl = 31
    keyframes = (16, 21)


def video_depacketizer(codec: str, max_size: int = MAX_ACCESS_UNIT) -> VideoDepacketizer | None:
    """For the FFmpeg codec name the agent uses (h264, hevc); None for another codec."""
    if codec == "h264":
        return H264Depacketizer(max_size)
    if codec == "hevc":
        return H265Depacketizer(max_size)
    return None


# -- parameter sets -------------------------------------------------------------------------


def _lower(fmtp: Mapping[str, str]) -> dict[str, str]:
    return {k.strip().lower(): v.strip() for k, v in fmtp.items()}


def _base64(text: str) -> bytes:
    try:  # some cameras leave the padding out
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


def parameter_sets_from_fmtp(codec: str, fmtp: Mapping[str, str]) -> bytes:
    """The parameter sets an SDP's fmtp carries, Annex-B: H.264 ``sprop-parameter-sets``
    (RFC 6184 §8.1), H.265 ``sprop-vps``/``sprop-sps``/``sprop-pps`` (RFC 7798 §7.1); each a
    comma-separated list of base64 NAL units. Entries that do not decode are left out."""
    params = _lower(fmtp)
    keys = (("sprop-parameter-sets",) if codec == "h264"
            else ("sprop-vps", "sprop-sps", "sprop-pps") if codec == "hevc" else ())
    nals = [_base64(item.strip()) for key in keys
            for item in params.get(key, "").split(",") if item.strip()]
    return b"".join(START_CODE + nal for nal in nals if nal)


def _skip_scaling_list(bits: BitReader, size: int) -> None:
    """H.264 7.3.2.1.1.1 scaling_list(): delta-coded until a zero next scale."""
    last = following = 8
    for _ in range(size):
        if following:
            delta = bits.se()
            if not -128 <= delta <= 127:
                raise BitstreamError("the H.264 SPS holds an out-of-range scaling list")
            following = (last + delta) & 0xFF
        if following:
            last = following
        else:
            return


def _h264_chroma(bits: BitReader) -> tuple[int, int]:
    """The High profiles' fields: chroma_format_idc and separate_colour_plane_flag returned,
    bit depths and scaling lists skipped."""
    chroma = bits.ue()
    if chroma > 3:
        raise BitstreamError("the H.264 SPS holds an invalid chroma format")
    separate_planes = bits.u(1) if chroma == 3 else 0
    bits.ue()  # bit_depth_luma_minus8
    bits.ue()  # bit_depth_chroma_minus8
    bits.u(1)  # qpprime_y_zero_transform_bypass_flag
    if bits.u(1):  # seq_scaling_matrix_present_flag
        for i in range(12 if chroma == 3 else 8):
            if bits.u(1):  # seq_scaling_list_present_flag[i]
                _skip_scaling_list(bits, 16 if i < 6 else 64)
    return chroma, separate_planes


def h264_sps_size(sps: bytes) -> tuple[int, int]:
    """The picture size an H.264 SPS NAL unit (header byte included) describes, after its
    frame cropping (H.264 7.3.2.1.1 and 7.4.2.1.1). Raises BitstreamError."""
    bits = BitReader(rbsp(bytes(sps[1:])))
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma, separate_planes = _h264_chroma(bits) if profile in H264_HIGH_PROFILES else (1, 0)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()  # num_ref_frames_in_pic_order_cnt_cycle
        if cycle > 255:
            raise BitstreamError("the H.264 SPS holds an invalid POC cycle")
        for _ in range(cycle):
            bits.se()  # offset_for_ref_frame[i]
    elif poc_type != 2:
        raise BitstreamError("the H.264 SPS holds an invalid pic_order_cnt_type")
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width = (bits.ue() + 1) * 16  # pic_width_in_mbs_minus1
    map_units = bits.ue() + 1  # pic_height_in_map_units_minus1
    frame_mbs_only = bits.u(1)
    height = map_units * 16 * (2 - frame_mbs_only)
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    if bits.u(1):  # frame_cropping_flag: offsets in crop units (Table 6-1, 7.4.2.1.1)
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        if chroma == 0 or separate_planes:  # ChromaArrayType 0
            unit_x, unit_y = 1, 2 - frame_mbs_only
        else:
            unit_x = 2 if chroma in (1, 2) else 1
            unit_y = (2 if chroma == 1 else 1) * (2 - frame_mbs_only)
        width -= unit_x * (left + right)
        height -= unit_y * (top + bottom)
    if width <= 0 or height <= 0:
        raise BitstreamError("the H.264 SPS crops the whole picture")
    return width, height


def video_size(codec: str, parameter_sets: bytes) -> tuple[int, int] | None:
    """Width and height from the first SPS in Annex-B ``parameter_sets`` (H.264 or H.265);
    None when there is none or it cannot be read."""
    for view in split_annexb(parameter_sets):
        nal = bytes(view)
        try:
            if codec == "h264" and nal and nal[0] & 0x1F == 7:
                return h264_sps_size(nal)
            if codec == "hevc" and len(nal) > 2 and (nal[0] >> 1) & 0x3F == 33:
                sps = parse_hevc_sps(nal)
                return (sps.width, sps.height) if sps.width > 0 and sps.height > 0 else None
        except (BitstreamError, IndexError):
            return None
    return None


# -- AAC (RFC 3640 mpeg4-generic) -----------------------------------------------------------


class AacConfig(NamedTuple):
    """What an AudioSpecificConfig (ISO/IEC 14496-3 1.6.2.1) says: ``sample_rate`` is the
    decoder's output rate (the SBR rate for HE-AAC with explicit signalling), ``channels``
    0 when a program config element defines them, ``frame_length`` samples per core frame."""

    object_type: int
    sample_rate: int
    channels: int
    frame_length: int


_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
              8000, 7350)
# Object types whose config is a GASpecificConfig (frameLengthFlag first)
_GA_TYPES = frozenset({1, 2, 3, 4, 6, 7, 17, 19, 20, 21, 22, 23})


def aac_extradata(fmtp: Mapping[str, str]) -> bytes:
    """The AudioSpecificConfig from the fmtp's ``config=`` hex (what a decoder's extradata
    is); empty if absent or not hex."""
    try:
        return bytes.fromhex(_lower(fmtp).get("config", ""))
    except ValueError:
        return b""


def aac_config(extradata: bytes) -> AacConfig:
    """Parse an AudioSpecificConfig. Raises BitstreamError."""
    bits = BitReader(extradata)

    def object_type() -> int:
        kind = bits.u(5)
        return 32 + bits.u(6) if kind == 31 else kind

    def rate() -> int:
        index = bits.u(4)
        if index == 15:
            return bits.u(24)
        if index >= len(_AAC_RATES):
            raise BitstreamError("the AAC config holds a reserved sampling frequency index")
        return _AAC_RATES[index]

    kind = object_type()
    sample_rate = rate()
    channels = bits.u(4)
    if kind in (5, 29):  # explicit SBR (HE-AAC) or PS (HE-AAC v2): output rate, core type
        sample_rate = rate()
        if kind == 29 and channels == 1:
            channels = 2  # parametric stereo decodes mono to stereo
        kind = object_type()
    frame_length = 960 if kind in _GA_TYPES and bits.u(1) else 1024
    if sample_rate == 0:
        raise BitstreamError("the AAC config holds a zero sample rate")
    return AacConfig(kind, sample_rate, channels, frame_length)


class AudioFrame(NamedTuple):
    data: bytes  # one raw AAC frame (no ADTS header)
    timestamp: int  # RTP


class AacDepacketizer:
    """RFC 3640 §3.2-3.3: an AU-headers section (16-bit length in bits, then per access unit
    its size, index or index delta, and the optional CTS/DTS/RAP/stream-state fields the fmtp
    announces), an optional auxiliary section, then the access units. A frame fragmented over
    several packets is reassembled; a lost fragment drops that frame. ``mode=AAC-hbr``
    without sizes in the fmtp gets the RFC's 13/3/3, ``AAC-lbr`` 6/2/2. Frames in a packet
    are ``frame_duration`` apart: ``constantDuration``, else the config's frame length (1024
    or 960; an HE-AAC stream whose RTP clock is its SBR rate would need twice that). Raises
    ValueError for an fmtp whose numbers are not numbers or out of range."""

    def __init__(self, fmtp: Mapping[str, str]) -> None:
        params = _lower(fmtp)
        defaults = {"aac-hbr": (13, 3, 3), "aac-lbr": (6, 2, 2)}.get(
            params.get("mode", "").lower(), (0, 0, 0))

        def number(key: str, default: int = 0, limit: int = 32) -> int:
            value = int(params.get(key, default))
            if not 0 <= value <= limit:
                raise ValueError(f"fmtp {key}={value} is out of range")
            return value

        self._size_bits = number("sizelength", defaults[0])
        self._index_bits = number("indexlength", defaults[1])
        self._delta_bits = number("indexdeltalength", defaults[2])
        self._cts_bits = number("ctsdeltalength")
        self._dts_bits = number("dtsdeltalength")
        self._rap = number("randomaccessindication") > 0
        self._state_bits = number("streamstateindication")
        self._aux_bits = number("auxiliarydatasizelength")
        self._constant_size = number("constantsize", 0, 0xFFFF)
        self._headers = any((self._size_bits, self._index_bits, self._delta_bits,
                             self._cts_bits, self._dts_bits, self._rap, self._state_bits))
        duration = number("constantduration", 0, 0xFFFF)
        if not duration:
            try:
                duration = aac_config(aac_extradata(params)).frame_length
            except BitstreamError:
                duration = 1024
        #: RTP timestamp ticks between consecutive frames (samples per frame).
        self.frame_duration = duration
        #: Packets and frames dropped (malformed, lost fragments).
        self.dropped = 0
        self._fragment = bytearray()
        self._fragment_size = 0  # the fragmented frame's size; 0 when none is open
        self._fragment_time = 0
        self._skipped = -1  # the timestamp of a fragmented frame being skipped
        self._next = -1

    def push(self, payload: memoryview, timestamp: int, marker: bool,
             sequence: int) -> list[AudioFrame]:
        """The frames one RTP payload completes (in sequence order)."""
        contiguous = sequence == self._next
        self._next = (sequence + 1) & 0xFFFF
        try:
            entries, start = self._read_headers(payload)
        except BitstreamError:
            entries = None
        if entries is None:
            self.dropped += 1
            return []
        end = len(payload)
        if len(entries) == 1 and entries[0][0] > end - start:
            return self._fragmented(payload[start:], entries[0][0], timestamp, marker,
                                    contiguous)
        if self._fragment_size:  # a new frame while one was being reassembled
            self._drop_fragment()
        frames = []
        for size, offset in entries:
            if start + size > end:
                self.dropped += 1
                break
            frames.append(AudioFrame(bytes(payload[start:start + size]),
                                     (timestamp + offset * self.frame_duration) & 0xFFFFFFFF))
            start += size
        return frames

    def _read_headers(self, payload: memoryview) -> tuple[list[tuple[int, int]] | None, int]:
        """Each frame's (size, index offset), and where the frames begin."""
        entries: list[tuple[int, int]] = []
        start = 0
        if self._headers:
            if len(payload) < 2:
                return None, 0
            length = (payload[0] << 8) | payload[1]  # AU-headers-length, bits
            start = 2 + (length + 7) // 8
            if start > len(payload):
                return None, 0
            bits = BitReader(bytes(payload[2:start]))
            offset = 0
            while bits.position < length:
                if len(entries) >= len(payload) - start:  # more frames than bytes
                    return None, 0
                size = bits.u(self._size_bits) if self._size_bits else self._constant_size
                if entries:
                    offset += bits.u(self._delta_bits) + 1
                else:
                    bits.u(self._index_bits)
                for field in (self._cts_bits, self._dts_bits):
                    if field and bits.u(1):  # CTS-flag / DTS-flag, then the delta
                        bits.u(field)
                bits.u(int(self._rap) + self._state_bits)
                entries.append((size, offset))
        if self._aux_bits:  # auxiliary section: its size in bits, then the data
            bits = BitReader(bytes(payload[start:start + 4]))
            start += (self._aux_bits + bits.u(self._aux_bits) + 7) // 8
            if start > len(payload):
                return None, 0
        if not entries:  # no AU headers: one frame, or frames of constantSize
            rest = len(payload) - start
            count = rest // self._constant_size if self._constant_size else 1
            entries = [(self._constant_size or rest, i) for i in range(count)]
        if any(size == 0 for size, _ in entries):
            return None, 0
        return entries, start

    def _fragmented(self, piece: memoryview, size: int, timestamp: int, marker: bool,
                    contiguous: bool) -> list[AudioFrame]:
        """§3.2.3: a frame larger than a packet, in consecutive packets with one AU header
        each (the whole frame's size), the marker bit on the last."""
        if self._fragment_size:
            same = size == self._fragment_size and timestamp == self._fragment_time
            if not (contiguous and same):
                self._drop_fragment()
                if same:  # the frame lost a fragment: skip the rest of it
                    self._skipped = timestamp
                    return []
        elif timestamp == self._skipped:
            return []
        if not self._fragment_size:
            self._fragment_size, self._fragment_time = size, timestamp
        self._fragment += piece
        if len(self._fragment) > size:
            self._drop_fragment()
        elif len(self._fragment) == size:
            frame = AudioFrame(bytes(self._fragment), timestamp)
            self._fragment.clear()
            self._fragment_size = 0
            return [frame]
        elif marker:  # the last fragment came and the frame is still short
            self._drop_fragment()
        return []

    def _drop_fragment(self) -> None:
        self._fragment.clear()
        self._fragment_size = 0
        self.dropped += 1
