"""Fragmented MP4 (ISO/IEC 14496-12, CMAF-style) written by hand for HLS: an init segment and
media fragments (moof + mdat), for H.264 (``avc1`` + avcC) and H.265 (``hvc1`` + hvcC).

The camera's access units arrive in Annex-B form (start codes). In the fragments every NAL
unit is prefixed by its 4-byte length instead; access unit delimiters, filler data and the
parameter sets are dropped from the samples — ``avc1``/``hvc1`` carry the parameter sets in
the init segment only (ISO/IEC 14496-15: for ``hvc1`` they must not be in the samples).

Writing the boxes here costs a few ``struct.pack`` calls per part; PyAV's mp4 muxer would
need a packet object per frame and a codec context set up from the SPS for the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from agent.media.stream import H264_HIGH_PROFILES, BitReader, BitstreamError, rbsp

VIDEO_TIMESCALE = 90_000
TRACK_ID = 1

# H.264 NAL unit types (ITU-T H.264 table 7-1)
H264_SPS, H264_PPS, H264_AUD, H264_FILLER = 7, 8, 9, 12
# H.265 NAL unit types (ITU-T H.265 table 7-1)
HEVC_VPS, HEVC_SPS, HEVC_PPS, HEVC_AUD, HEVC_FILLER = 32, 33, 34, 35, 38
_DROPPED = {"h264": frozenset({H264_SPS, H264_PPS, H264_AUD, H264_FILLER}),
            "hevc": frozenset({HEVC_VPS, HEVC_SPS, HEVC_PPS, HEVC_AUD, HEVC_FILLER})}

# trun sample flags (ISO/IEC 14496-12 8.8.3.1): a sync sample depends on no other; others do
# and are marked non-sync.
SYNC_FLAGS = 0x02000000
NON_SYNC_FLAGS = 0x01010000

_U32 = struct.Struct(">I")


class Fmp4Error(ValueError):
    """The stream cannot be put in fMP4 (no parameter sets, an unparsable SPS…)."""


# -- NAL units ----------------------------------------------------------------------------------


def split_nals(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B byte string (3- or 4-byte start codes), without them."""
    out: list[bytes] = []
    find = data.find
    start = find(b"\x00\x00\x01")
    if start < 0:
        return [data] if data else []
    start += 3
    while True:
        nxt = find(b"\x00\x00\x01", start)
        if nxt < 0:
            out.append(data[start:])
            return out
        end = nxt - 1 if data[nxt - 1] == 0 else nxt  # a 4-byte start code's leading zero
        if end > start:
            out.append(data[start:end])
        start = nxt + 3


def nal_type(codec: str, nal: bytes) -> int:
    return (nal[0] >> 1) & 0x3F if codec == "hevc" else nal[0] & 0x1F


def length_prefixed(codec: str, annexb: bytes) -> bytes:
    """One access unit as an ISO sample: 4-byte lengths, no AUD/filler/parameter sets."""
    dropped = _DROPPED[codec]
    shift, mask = (1, 0x3F) if codec == "hevc" else (0, 0x1F)
    parts: list[bytes] = []
    for nal in split_nals(annexb):
        if nal and (nal[0] >> shift) & mask not in dropped:
            parts.append(_U32.pack(len(nal)))
            parts.append(nal)
    return b"".join(parts)


# -- codec configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class VideoTrack:
    """What the init segment and the playlists say about a camera's video."""

    codec: str  # h264 | hevc
    width: int
    height: int
    #: RFC 6381 codec string for EXT-X-STREAM-INF CODECS: avc1.64001f, hvc1.1.6.L93.B0…
    codec_string: str
    #: The avcC or hvcC box (ISO/IEC 14496-15), parameter sets included.
    config_box: bytes
    #: The parameter sets it was made from (Annex-B), to notice a change.
    parameter_sets: bytes


def video_track(codec: str, width: int, height: int, *annexb: bytes) -> VideoTrack:
    """The track for a stream whose parameter sets are in ``annexb`` (the keyframe first,
    then the stream's out-of-band parameter sets). Every parameter set id is kept (a camera
    may use several PPS); for an id given twice, the first wins (in-band over the SDP's)."""
    if codec not in _DROPPED:
        raise Fmp4Error(f"{codec!r} video cannot be carried in HLS here (H.264 or H.265 only)")
    wanted = (H264_SPS, H264_PPS) if codec == "h264" else (HEVC_VPS, HEVC_SPS, HEVC_PPS)
    found: dict[int, dict[int, bytes]] = {k: {} for k in wanted}
    for data in annexb:
        for nal in split_nals(data):
            kind = nal_type(codec, nal) if nal else -1
            if kind in found:
                found[kind].setdefault(_set_id(codec, kind, nal), nal)
    missing = [k for k in wanted if not found[k]]
    if missing:
        names = {H264_SPS: "SPS", H264_PPS: "PPS", HEVC_VPS: "VPS", HEVC_SPS: "SPS",
                 HEVC_PPS: "PPS"}
        raise Fmp4Error("the camera sent no " + "/".join(names[k] for k in missing)
                        + " parameter set (neither in its SDP nor before a keyframe)")
    lists = [list(found[k].values())[:31 if k == H264_SPS else 255] for k in wanted]
    sets = b"".join(b"\x00\x00\x00\x01" + nal for nals in lists for nal in nals)
    try:
        box, string = _avcc(*lists) if codec == "h264" else _hvcc(*lists)
    except BitstreamError as exc:
        raise Fmp4Error(str(exc)) from exc
    return VideoTrack(codec, width, height, string, box, sets)


def _set_id(codec: str, kind: int, nal: bytes) -> int:
    """The id of a parameter set (-1 if it cannot be read: kept apart from the others)."""
    try:
        if codec == "h264":
            bits = BitReader(rbsp(nal[1:]))
            if kind == H264_SPS:
                bits.u(24)  # profile, constraint flags, level
            return bits.ue()
        if kind == HEVC_VPS:
            return nal[2] >> 4
        if kind == HEVC_SPS:
            return parse_hevc_sps(nal).sps_id
        return BitReader(rbsp(nal[2:])).ue()
    except (BitstreamError, IndexError):
        return -1


def _avcc(sps_list: list[bytes], pps_list: list[bytes]) -> tuple[bytes, str]:
    sps = sps_list[0]
    if len(sps) < 4:
        raise Fmp4Error("the H.264 SPS is too short")
    profile, compat, level = sps[1], sps[2], sps[3]
    body = bytes([1, profile, compat, level, 0xFF, 0xE0 | len(sps_list)])
    body += b"".join(struct.pack(">H", len(n)) + n for n in sps_list)
    body += bytes([len(pps_list)]) + b"".join(struct.pack(">H", len(n)) + n for n in pps_list)
    if profile in H264_HIGH_PROFILES:  # ISO/IEC 14496-15 5.3.3.1.2: chroma and bit depths
        bits = BitReader(rbsp(sps[1:]))
        bits.u(24)
        bits.ue()  # seq_parameter_set_id
        chroma = bits.ue()
        if chroma == 3:
            bits.u(1)
        luma_depth, chroma_depth = bits.ue(), bits.ue()
        if chroma > 3 or luma_depth > 6 or chroma_depth > 6:
            raise BitstreamError("the H.264 SPS holds out-of-range values")
        body += bytes([0xFC | chroma, 0xF8 | luma_depth, 0xF8 | chroma_depth, 0])
    return box(b"avcC", body), f"avc1.{profile:02x}{compat:02x}{level:02x}"


@dataclass(frozen=True)
class HevcSps:
    """The fields of an H.265 SPS that hvcC and the codec string carry (H.265 7.3.2.2)."""

    profile_space: int
    tier: int
    profile_idc: int
    compatibility: int  # 32 flags, general_profile_compatibility_flag[0] first (MSB)
    constraints: bytes  # 6 bytes: progressive_source_flag … (48 bits)
    level_idc: int
    max_sub_layers: int
    temporal_id_nesting: int
    sps_id: int
    chroma_format_idc: int
    width: int
    height: int
    bit_depth_luma_minus8: int
    bit_depth_chroma_minus8: int


def parse_hevc_sps(nal: bytes) -> HevcSps:
    bits = BitReader(rbsp(nal[2:]))  # after the 2-byte NAL unit header
    bits.u(4)  # sps_video_parameter_set_id
    sub_layers_minus1 = bits.u(3)
    nesting = bits.u(1)
    space, tier, profile = bits.u(2), bits.u(1), bits.u(5)
    compat = bits.u(32)
    constraints = bits.u(48).to_bytes(6, "big")
    level = bits.u(8)
    present = [(bits.u(1), bits.u(1)) for _ in range(sub_layers_minus1)]
    if sub_layers_minus1 > 0:
        for _ in range(sub_layers_minus1, 8):
            bits.u(2)  # reserved_zero_2bits
    for profile_present, level_present in present:
        if profile_present:
            bits.u(88)
        if level_present:
            bits.u(8)
    sps_id = bits.ue()
    chroma = bits.ue()
    if chroma == 3:
        bits.u(1)  # separate_colour_plane_flag
    width, height = bits.ue(), bits.ue()
    if bits.u(1):  # conformance_window_flag
        sub_w = 2 if chroma in (1, 2) else 1
        sub_h = 2 if chroma == 1 else 1
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        width -= sub_w * (left + right)
        height -= sub_h * (top + bottom)
    luma, chroma_depth = bits.ue(), bits.ue()
    if chroma > 3 or luma > 8 or chroma_depth > 8:
        raise BitstreamError("the H.265 SPS holds out-of-range values")
    return HevcSps(space, tier, profile, compat, constraints, level, sub_layers_minus1 + 1,
                   nesting, sps_id, chroma, width, height, luma, chroma_depth)


def hevc_codec_string(sps: HevcSps) -> str:
    """RFC 6381 / ISO/IEC 14496-15 annex E: hvc1.<space><profile>.<compat>.<tier><level>.<c>"""
    reversed_compat = int(f"{sps.compatibility:032b}"[::-1], 2)
    constraints = sps.constraints.rstrip(b"\x00")
    text = (f"hvc1.{'ABC'[sps.profile_space - 1] if sps.profile_space else ''}"
            f"{sps.profile_idc}.{reversed_compat:X}.{'H' if sps.tier else 'L'}{sps.level_idc}")
    return text + "".join(f".{b:X}" for b in constraints)


def _hvcc(vps: list[bytes], sps_nals: list[bytes], pps: list[bytes]) -> tuple[bytes, str]:
    sps = parse_hevc_sps(sps_nals[0])
    body = bytes([1, (sps.profile_space << 6) | (sps.tier << 5) | sps.profile_idc])
    body += _U32.pack(sps.compatibility) + sps.constraints + bytes([sps.level_idc])
    body += struct.pack(">HBBBBH", 0xF000, 0xFC, 0xFC | sps.chroma_format_idc,
                        0xF8 | sps.bit_depth_luma_minus8, 0xF8 | sps.bit_depth_chroma_minus8, 0)
    body += bytes([(min(sps.max_sub_layers, 7) << 3) | (sps.temporal_id_nesting << 2) | 3, 3])
    for kind, nals in ((HEVC_VPS, vps), (HEVC_SPS, sps_nals), (HEVC_PPS, pps)):
        body += bytes([0x80 | kind]) + struct.pack(">H", len(nals))
        body += b"".join(struct.pack(">H", len(n)) + n for n in nals)
    return box(b"hvcC", body), hevc_codec_string(sps)


# -- boxes -----------------------------------------------------------------------------------


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return _U32.pack(8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, _U32.pack((version << 24) | flags), *payload)


_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)


def init_segment(track: VideoTrack) -> bytes:
    """ftyp + moov (one video track, timescale 90 kHz, mvex/trex for fragments)."""
    ftyp = box(b"ftyp", b"iso5", _U32.pack(512), b"iso5iso6mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0),
                    struct.pack(">IH", 0x00010000, 0x0100), bytes(10), _MATRIX, bytes(24),
                    _U32.pack(TRACK_ID + 1))
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, TRACK_ID, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX,
                    struct.pack(">II", track.width << 16, track.height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, VIDEO_TIMESCALE, 0, 0x55C4, 0))
    hdlr = full_box(b"hdlr", 0, 0, _U32.pack(0), b"vide", bytes(12), b"VideoHandler\x00")
    entry = box(b"avc1" if track.codec == "h264" else b"hvc1",
                bytes(6), struct.pack(">H", 1), bytes(16),
                struct.pack(">HHIIIH", track.width, track.height, 0x00480000, 0x00480000, 0, 1),
                bytes(32), struct.pack(">Hh", 0x0018, -1), track.config_box)
    stbl = box(b"stbl",
               full_box(b"stsd", 0, 0, _U32.pack(1), entry),
               full_box(b"stts", 0, 0, _U32.pack(0)),
               full_box(b"stsc", 0, 0, _U32.pack(0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
               full_box(b"stco", 0, 0, _U32.pack(0)))
    minf = box(b"minf", full_box(b"vmhd", 0, 1, bytes(8)),
               box(b"dinf", full_box(b"dref", 0, 0, _U32.pack(1), full_box(b"url ", 0, 1))),
               stbl)
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", TRACK_ID, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


class Sample(NamedTuple):
    data: bytes  # length-prefixed NAL units
    duration: int  # 90 kHz ticks
    keyframe: bool


def fragment(sequence: int, base_time: int, samples: Sequence[Sample]) -> bytes:
    """moof + mdat for ``samples`` (decode order = presentation order: no B-frames are
    reordered, composition offsets are all 0), starting at ``base_time`` (90 kHz)."""
    count = len(samples)
    flat: list[int] = []
    for s in samples:
        flat += (s.duration, len(s.data), SYNC_FLAGS if s.keyframe else NON_SYNC_FLAGS)
    entries = struct.pack(f">{3 * count}I", *flat)
    # moof = 8 + mfhd 16 + traf (8 + tfhd 16 + tfdt 20 + trun 20 + 12 per sample)
    moof_size = 8 + 16 + 8 + 16 + 20 + 20 + len(entries)
    trun = full_box(b"trun", 0, 0x000701, struct.pack(">Ii", count, moof_size + 8), entries)
    traf = box(b"traf", full_box(b"tfhd", 0, 0x020000, _U32.pack(TRACK_ID)),
               full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time)), trun)
    moof = box(b"moof", full_box(b"mfhd", 0, 0, _U32.pack(sequence)), traf)
    assert len(moof) == moof_size
    return moof + mdat(s.data for s in samples)


def mdat(chunks: Iterable[bytes]) -> bytes:
    body = b"".join(chunks)
    return _U32.pack(8 + len(body)) + b"mdat" + body
