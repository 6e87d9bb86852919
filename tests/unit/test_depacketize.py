"""RTP depacketizing (agent/media/depacketize.py): access units back from the agent's own
packetizer (agent/media/rtp.py) for x264/x265 streams encoded here, loss and hostile input,
SPS sizes of real x264/x265 parameter sets (checked against FFmpeg's decoder where a test
rewrites one), AAC per RFC 3640 round trip through FFmpeg's AAC encoder and decoder."""

from __future__ import annotations

import base64
import itertools
import random
import re
import struct
import tracemalloc
from fractions import Fraction
from typing import Any

import av
import pytest

from agent.media.depacketize import (
    AacConfig,
    AacDepacketizer,
    AccessUnit,
    AudioFrame,
    H264Depacketizer,
    H265Depacketizer,
    aac_config,
    aac_extradata,
    h264_sps_size,
    parameter_sets_from_fmtp,
    parse_rtp,
    video_depacketizer,
    video_size,
)
from agent.media.rtp import AacPacketizer, H264Packetizer, H265Packetizer, split_annexb
from agent.media.stream import BitReader, BitstreamError, MediaPacket, rbsp
from tests.unit.test_hls_fmp4 import encode

SC = b"\x00\x00\x00\x01"
CLOCK = Fraction(1, 90_000)
Packet = tuple[bytes, int, bool, int]  # payload, timestamp, marker, sequence

# Real SPS NAL units, written by x264/x265 3.5 (FFmpeg 5.1, Debian 12) and read back with
# agent.media.rtp.split_annexb; width x height as ffprobe reports them. Made by
#   ffmpeg -f lavfi -i testsrc2=size=WxH:rate=30 -frames:v 1 -c:v libx264 \
#       -profile:v P -pix_fmt F [-x264-params X] -f h264 out.h264
SPS_HIGH_1080 = "67640028acd940780227e5c044000003000400000300f03c60c658"  # high, yuv420p
SPS_BASELINE_720 = "6742c01fd9005005bb0110000003001000000303c0f1832480"  # baseline
SPS_MAIN_360 = "674d401eeca05017fcb80880000003008000001e078b16cb"  # main, 360 = 368 - 8
SPS_HIGH444_1080 = "67f40028919b280f0044fc4e0220000003002000000781e30632c0"  # high444,
# yuv444p, -x264-params cqm=jvt (x264 writes its matrices in the PPS, never in the SPS)
SPS_HIGH444_1912x1076 = "67f40028919b280f0044f131b80880000003008000001e078c18cb"  # 4:4:4
# crop units are 1 luma sample
SPS_HIGH422_1440 = "677a0028b6cd9405a0227e270110000003001000000303c0f1831960"  # high422,
# yuv422p10le: crop units 2 across, 1 down
SPS_INTERLACED_576 = "6764001eacd940b424d8088000000300800000190f8a14cb"  # 720x576,
# -flags +ildct -x264-params interlaced=1: frame_mbs_only_flag 0, map units of 32 lines
SPS_1366x768 = "67640020acd94056061e6f0110000003001000000303c0f1831960"
# -c:v libx265 -f hevc, 1920x1080 (conformance window: 1088 - 8)
HEVC_SPS_1080 = ("420101016000000300900000030000030078a003c08010e596566924caf01680800000030080"
                 "00000f04")


# -- RTP packets from the agent's packetizer -----------------------------------------------


def packets(packetizer: H264Packetizer | H265Packetizer, units: list[tuple[bytes, bool]],
            first_sequence: int = 65_530, first_timestamp: int = 0xFFFF_0000) -> list[Packet]:
    out: list[Packet] = []
    sequence = first_sequence
    for i, (data, key) in enumerate(units):
        ts = (first_timestamp + i * 6000) & 0xFFFFFFFF
        for p in packetizer.packetize(MediaPacket(True, data, ts, CLOCK, key)):
            out.append((p.prefix + bytes(p.body), ts, p.marker, sequence & 0xFFFF))
            sequence += 1
    return out


def feed(depacketizer: H264Depacketizer | H265Depacketizer,
         pkts: list[Packet]) -> list[AccessUnit]:
    """The access units that come out, each checked to say where its NAL units begin
    (what the packetizer then uses instead of looking for start codes), then without."""
    out: list[AccessUnit] = []
    for payload, ts, marker, seq in pkts:
        for unit in depacketizer.push(memoryview(payload), ts, marker, seq):
            starts = [m.start() for m in re.finditer(re.escape(SC), unit.data)]
            assert list(unit.nals) == starts, "where the NAL units begin"
            out.append(AccessUnit(unit.data, unit.timestamp, unit.keyframe))
    return out


def annexb(nals: list[bytes]) -> bytes:
    return b"".join(SC + n for n in nals)


def expected(codec: str, data: bytes) -> bytes:
    """What comes back: 4-byte start codes, no access unit delimiter (the packetizer drops
    them; x264/x265 put the parameter sets first already)."""
    aud = (lambda n: n[0] & 0x1F == 9) if codec == "h264" else (lambda n: n[0] >> 1 == 35)
    return annexb([bytes(n) for n in split_annexb(data) if not aud(n)])


STREAMS: dict[str, Any] = {}


def stream(codec: str) -> list[tuple[bytes, bool]]:
    """30 frames of x264 (with AUDs) or x265, a keyframe every 10, encoded once."""
    if codec not in STREAMS:
        STREAMS[codec] = (
            encode("libx264", 30, 10, {"bf": "0", "aud": "1"}) if codec == "h264" else
            encode("libx265", 30, 10,
                   {"x265-params": "log-level=error:bframes=0:keyint=10:aud=1"}))
    units: list[tuple[bytes, bool]] = STREAMS[codec]
    return units


def packetizer(codec: str, size: int) -> H264Packetizer | H265Packetizer:
    return H264Packetizer(b"", size) if codec == "h264" else H265Packetizer(b"", size)


def depacketizer(codec: str, max_size: int = 4 << 20) -> H264Depacketizer | H265Depacketizer:
    return H264Depacketizer(max_size) if codec == "h264" else H265Depacketizer(max_size)


def kinds(codec: str, pkts: list[Packet]) -> set[int]:
    return {p[0][0] & 0x1F if codec == "h264" else (p[0][0] >> 1) & 0x3F for p in pkts}


@pytest.mark.parametrize("codec", ["h264", "hevc"])
@pytest.mark.parametrize("size", [1200, 150])
def test_round_trip_through_the_packetizer(codec: str, size: int) -> None:
    units = stream(codec)
    pkts = packets(packetizer(codec, size), units)
    single, aggregate, fragment = (1, 24, 28) if codec == "h264" else (1, 48, 49)
    assert {single, aggregate} <= kinds(codec, pkts)
    assert fragment in kinds(codec, pkts) or size == 1200
    dep = depacketizer(codec)
    out = feed(dep, pkts)
    assert [a.data for a in out] == [expected(codec, d) for d, _ in units]
    assert [a.keyframe for a in out] == [k for _, k in units] and sum(a.keyframe for a in out) == 3
    assert [a.timestamp for a in out] == [p[1] for p in pkts if p[2]]
    assert any(b.timestamp < a.timestamp for a, b in itertools.pairwise(out))  # wrap
    assert dep.dropped == 0
    for data in (a.data for a in out):  # FFmpeg takes them
        assert data.startswith(SC)
    decoder: Any = av.CodecContext.create(codec, "r")
    frames = [f for a in out for f in decoder.decode(av.Packet(a.data))]
    frames += decoder.decode(None)
    assert len(frames) == len(units)


def test_video_depacketizer_by_codec_name() -> None:
    assert isinstance(video_depacketizer("h264"), H264Depacketizer)
    assert isinstance(video_depacketizer("hevc"), H265Depacketizer)
    assert video_depacketizer("mjpeg") is None


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_a_camera_without_marker_bits_ends_units_on_the_next_timestamp(codec: str) -> None:
    units = stream(codec)
    pkts = [(p, ts, False, seq) for p, ts, _, seq in packets(packetizer(codec, 300), units)]
    dep = depacketizer(codec)
    out: list[tuple[int, AccessUnit]] = []
    for i, (payload, ts, marker, seq) in enumerate(pkts):
        out += [(i, a) for a in dep.push(memoryview(payload), ts, marker, seq)]
    assert [a.data for _, a in out] == [expected(codec, d) for d, _ in units[:-1]]
    # each one as the first packet of the next timestamp arrives
    firsts = [i for i in range(1, len(pkts)) if pkts[i][1] != pkts[i - 1][1]]
    assert [i for i, _ in out] == firsts
    assert out[0][1].keyframe and not out[1][1].keyframe
    (last,) = dep.push(memoryview(nal264(1, 20)), 123, True, (pkts[-1][3] + 1) & 0xFFFF)[:1]
    assert last.data == expected(codec, units[-1][0])


def nal264(kind: int, size: int) -> bytes:
    return bytes([0x60 | kind]) + bytes((i % 200) + 1 for i in range(size - 1))


def fu_a(nal: bytes, step: int) -> list[bytes]:
    body = nal[1:]
    out = []
    for pos in range(0, len(body), step):
        flags = (0x80 if pos == 0 else 0) | (0x40 if pos + step >= len(body) else 0)
        out.append(bytes([(nal[0] & 0xE0) | 28, flags | (nal[0] & 0x1F)]) + body[pos:pos + step])
    return out


def stap_a(*nals: bytes) -> bytes:
    return bytes([0x78]) + b"".join(struct.pack("!H", len(n)) + n for n in nals)


SEI, SLICE, TAIL = nal264(6, 30), nal264(1, 3000), nal264(1, 50)


def one_unit(lost: int | None) -> list[Packet]:
    """SEI, a slice in 3 FU-A packets, a small slice; packet ``lost`` is not sent."""
    payloads = [SEI, *fu_a(SLICE, 1100), TAIL]
    pkts = [(p, 900, i == len(payloads) - 1, 100 + i) for i, p in enumerate(payloads)]
    return [p for i, p in enumerate(pkts) if i != lost]


@pytest.mark.parametrize("lost", [1, 2, 3])  # the fragments: first, middle, last
def test_a_lost_fragment_drops_that_nal_unit_only(lost: int) -> None:
    dep = H264Depacketizer()
    assert feed(dep, one_unit(None)) == [AccessUnit(annexb([SEI, SLICE, TAIL]), 900, False)]
    assert feed(dep, one_unit(lost)) == [AccessUnit(annexb([SEI, TAIL]), 900, False)]
    assert dep.dropped == 1
    assert feed(dep, [(nal264(5, 40), 1800, True, 105)]) == [
        AccessUnit(annexb([nal264(5, 40)]), 1800, True)]


def test_a_fragmented_unit_whose_end_never_comes_is_dropped_at_the_next_start() -> None:
    first, second = fu_a(SLICE, 1100)[:2], fu_a(nal264(1, 2000), 1100)
    pkts = [(p, 0, False, i) for i, p in enumerate(first + second)]
    pkts[-1] = (*pkts[-1][:2], True, pkts[-1][3])
    dep = H264Depacketizer()
    assert feed(dep, pkts) == [AccessUnit(annexb([nal264(1, 2000)]), 0, False)]
    assert dep.dropped == 1


def test_parameter_sets_sent_with_their_own_marker_stay_with_the_keyframe() -> None:
    sps, pps, idr = bytes.fromhex(SPS_BASELINE_720), bytes.fromhex("68cb83cb20"), nal264(5, 99)
    dep = H264Depacketizer()
    assert feed(dep, [(stap_a(sps, pps), 0, True, 1)]) == []
    assert feed(dep, [(idr, 0, True, 2)]) == [AccessUnit(annexb([sps, pps, idr]), 0, True)]


def test_a_new_timestamp_with_a_marker_completes_two_units() -> None:
    dep = H264Depacketizer()
    assert feed(dep, [(nal264(1, 10), 0, False, 7)]) == []
    assert dep.push(memoryview(nal264(1, 11)), 3000, True, 8) == (
        AccessUnit(annexb([nal264(1, 10)]), 0, False, (0,)),
        AccessUnit(annexb([nal264(1, 11)]), 3000, False, (0,)))


def test_h265_keyframes_are_the_irap_pictures() -> None:
    for kind, key in ((1, False), (9, False), (16, True), (19, True), (21, True), (22, False)):
        dep = H265Depacketizer()
        nal = bytes([kind << 1, 1]) + b"\x55" * 10
        (unit,) = dep.push(memoryview(nal), 0, True, 0)
        assert unit.keyframe is key and unit.data == SC + nal


# -- hostile and broken input ----------------------------------------------------------------


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_truncated_and_random_payloads_never_raise(codec: str) -> None:
    pkts = packets(packetizer(codec, 150), stream(codec)[:11])
    dep = depacketizer(codec, max_size=50_000)
    seq = 0
    for payload, ts, marker, _ in pkts:  # every prefix of every packet
        for end in range(len(payload) + 1):
            dep.push(memoryview(payload[:end]), ts, marker, seq)
            seq = (seq + 1) & 0xFFFF
    rng = random.Random(7)
    for _ in range(20_000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
        dep.push(memoryview(payload), rng.choice((0, 1, 2)), rng.random() < 0.3,
                 rng.randrange(0, 65536))
    assert dep.dropped > 0
    # and it comes back as soon as good packets do
    good = packets(packetizer(codec, 150), stream(codec)[:3], 9, 12_345)
    out = feed(dep, good)  # (after what was left of the random unit, if anything)
    assert [a.data for a in out[-3:]] == [expected(codec, d) for d, _ in stream(codec)[:3]]
    assert len(out) <= 4


def test_aggregation_sizes_past_the_end_drop_that_packet() -> None:
    dep = H264Depacketizer()
    sps = bytes.fromhex(SPS_HIGH_1080)
    bad = [stap_a(sps)[:-1], stap_a(sps) + b"\x00", stap_a(sps) + b"\x00\x05\x41",
           bytes([0x78]), stap_a(sps, b"")]
    pkts = [(p, 0, False, i) for i, p in enumerate(bad)] + [(nal264(1, 9), 0, True, 9)]
    assert feed(dep, pkts) == [AccessUnit(annexb([nal264(1, 9)]), 0, False)]
    assert dep.dropped == 5
    dep5 = H265Depacketizer()
    ap = bytes([48 << 1, 1]) + struct.pack("!H", 30) + bytes([2, 1]) + b"\x11" * 10
    assert feed(dep5, [(ap, 0, True, 0)]) == [] and dep5.dropped == 1


def test_fragments_without_their_start_and_unsupported_modes_are_dropped() -> None:
    dep = H264Depacketizer()
    middle_and_end = fu_a(SLICE, 1100)[1:]
    others = [bytes([0x60 | kind]) + b"\x01" * 20 for kind in (0, 25, 26, 27, 29, 30, 31)]
    pkts = [(p, 0, i == 8, i) for i, p in enumerate(middle_and_end + others)]
    assert feed(dep, pkts) == []
    assert dep.dropped == 1 + len(others)  # the fragmented unit, the others


def peak_while(action: Any) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_an_endless_fragmented_unit_and_a_10_mb_unit_are_dropped_in_bounded_memory(
        codec: str) -> None:
    limit = 1 << 20
    dep = depacketizer(codec, max_size=limit)
    header = bytes([0x7C, 0x81]) if codec == "h264" else bytes([49 << 1, 1, 0x81])
    middle = bytes([header[0], 0x01]) if codec == "h264" else bytes([49 << 1, 1, 0x01])
    chunk = b"\x42" * 1200
    single = nal264(1, 1200) if codec == "h264" else bytes([2, 1]) + chunk

    def endless() -> None:  # 10 MB of one fragmented unit, no end, no marker
        dep.push(memoryview(header + chunk), 0, False, 0)
        for seq in range(1, 9000):
            assert dep.push(memoryview(middle + chunk), 0, False, seq) == ()

    def huge() -> None:  # 10 MB of single NAL units in one access unit
        for seq in range(9000, 17_500):
            assert dep.push(memoryview(single), 3000, seq == 17_499, seq) == ()

    assert peak_while(endless) < limit + (512 << 10)
    assert peak_while(huge) < limit + (512 << 10)
    assert dep.dropped == 2
    (unit,) = dep.push(memoryview(single), 6000, True, 17_500)
    assert unit.data == SC + single


# -- RTP header ----------------------------------------------------------------------------


def rtp(payload: bytes, *, csrc: int = 0, extension: bytes | None = None, padding: int = 0,
        marker: bool = True) -> bytes:
    first = 0x80 | (0x20 if padding else 0) | (0x10 if extension is not None else 0) | csrc
    head = struct.pack("!BBHII", first, (0x80 if marker else 0) | 97, 65535, 0xDEADBEEF, 1)
    head += b"\xaa\xbb\xcc\xdd" * csrc
    if extension is not None:
        head += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    pad = b"\x00" * (padding - 1) + bytes([padding]) if padding else b""
    return head + payload + pad


def test_parse_rtp_skips_csrcs_extension_and_padding() -> None:
    body = b"\x65payload"
    for packet in (rtp(body), rtp(body, csrc=3), rtp(body, extension=b"\x10\xff\x00\x00"),
                   rtp(body, csrc=1, extension=b"", padding=4)):
        parsed = parse_rtp(memoryview(packet))
        assert parsed is not None
        pt, marker, seq, ts, payload = parsed
        assert (pt, marker, seq, ts, bytes(payload)) == (97, True, 65535, 0xDEADBEEF, body)
    parsed = parse_rtp(memoryview(rtp(b"", marker=False)))
    assert parsed is not None and not parsed[1] and not parsed[4]


def test_parse_rtp_refuses_what_is_not_rtp_version_2() -> None:
    good = rtp(b"\x65abc")
    bad = [good[:11], b"\x40" + good[1:], b"",
           rtp(b"ab", padding=1)[:-1] + b"\x00",  # padding count 0
           rtp(b"ab", padding=1)[:-1] + b"\x40",  # more padding than packet
           rtp(b"", csrc=15)[:20],  # CSRC list past the end
           rtp(b"", extension=b"\x00" * 8)[:18],  # extension past the end
           (b"\x90" + good[1:12] + b"\x00\x00"),  # extension header cut
           ]
    for packet in bad:
        assert parse_rtp(memoryview(packet)) is None, packet.hex()


# -- parameter sets and sizes --------------------------------------------------------------


@pytest.mark.parametrize(("sps", "size"), [
    (SPS_HIGH_1080, (1920, 1080)), (SPS_BASELINE_720, (1280, 720)), (SPS_MAIN_360, (640, 360)),
    (SPS_HIGH444_1080, (1920, 1080)), (SPS_HIGH444_1912x1076, (1912, 1076)),
    (SPS_HIGH422_1440, (1440, 1080)), (SPS_INTERLACED_576, (720, 576)),
    (SPS_1366x768, (1366, 768))])
def test_h264_sps_sizes(sps: str, size: tuple[int, int]) -> None:
    assert h264_sps_size(bytes.fromhex(sps)) == size
    assert video_size("h264", SC + bytes.fromhex(sps) + SC + b"\x68\xeb") == size


class BitWriter:
    """The test's own Exp-Golomb writer (H.264 9.1), to build SPSs x264 never writes."""

    def __init__(self, bits: str = "") -> None:
        self.bits = bits

    def u(self, n: int, value: int) -> BitWriter:
        self.bits += format(value, f"0{n}b") if n else ""
        return self

    def ue(self, value: int) -> BitWriter:
        code = format(value + 1, "b")
        self.bits += "0" * (len(code) - 1) + code
        return self

    def se(self, value: int) -> BitWriter:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def nal(self, header: int) -> bytes:
        """rbsp_trailing_bits, then emulation prevention (7.4.1)."""
        bits = self.bits + "1"
        bits += "0" * (-len(bits) % 8)
        out, zeros = bytearray([header]), 0
        for byte in int(bits, 2).to_bytes(len(bits) // 8, "big"):
            if zeros >= 2 and byte <= 3:
                out.append(3)
                zeros = 0
            out.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return bytes(out)


def scaling_lists(count: int) -> str:
    """``count`` seq_scaling_list_present_flag + scaling_list() (7.3.2.1.1.1): absent, the
    default (delta -8 at the start), a list of varied values, one that repeats its last."""
    bits = BitWriter()
    for i in range(count):
        size = 16 if i < 6 else 64
        if i % 4 == 0:
            bits.u(1, 0)
        elif i % 4 == 1:
            bits.u(1, 1).se(-8)
        elif i % 4 == 2:
            bits.u(1, 1)
            last = 8
            for j in range(size):
                value = 4 + (j * 37) % 200
                bits.se((value - last + 128) % 256 - 128)
                last = value
        else:
            bits.u(1, 1).se(5).se(-3).se(-10)  # 13, 10, then 0: the rest repeats 10
    return bits.bits


def test_a_444_sps_with_scaling_lists_reads_as_ffmpeg_reads_it() -> None:
    """x264 puts its matrices in the PPS: this rewrites its High 4:4:4 SPS with 12 scaling
    lists in it; FFmpeg's decoder must still decode the frame, at the size parsed here."""
    width, height = 200, 120  # 120 = 8 macroblocks - 8 lines of cropping
    ctx: Any = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv444p"
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame(width, height, "yuv444p")
    for plane in frame.planes:
        plane.update(bytes(range(256)) * (plane.buffer_size // 256) + bytes(
            plane.buffer_size % 256))
    frame.pts = 0
    data = b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])
    nals = [bytes(n) for n in split_annexb(data)]
    sps = next(n for n in nals if n[0] & 0x1F == 7)
    assert sps[1] == 244
    reader = BitReader(rbsp(sps[1:]))
    reader.u(24)
    reader.ue()
    assert reader.ue() == 3  # chroma_format_idc
    reader.u(1)
    reader.ue()
    reader.ue()
    reader.u(1)
    flag_at = reader.position
    bits = "".join(format(b, "08b") for b in rbsp(sps[1:])).rstrip("0")[:-1]
    assert bits[flag_at] == "0"  # seq_scaling_matrix_present_flag
    rewritten = BitWriter(bits[:flag_at] + "1" + scaling_lists(12)
                          + bits[flag_at + 1:]).nal(sps[0])
    assert h264_sps_size(rewritten) == (width, height)
    stream_ = annexb([rewritten if n[0] & 0x1F == 7 else n for n in nals])
    decoder: Any = av.CodecContext.create("h264", "r")
    frames = [*decoder.decode(av.Packet(stream_)), *decoder.decode(None)]
    assert [(f.width, f.height) for f in frames] == [(width, height)]
    with pytest.raises(BitstreamError):  # a scaling list cut short
        h264_sps_size(BitWriter(bits[:flag_at] + "1" + scaling_lists(3)[:40]).nal(sps[0]))


def test_pic_order_cnt_type_1_and_field_coding_with_4_2_0_cropping() -> None:
    sps = (BitWriter().u(8, 77).u(16, 0x401E).ue(0)  # Main, level 3, id 0
           .ue(0)  # log2_max_frame_num_minus4
           .ue(1).u(1, 0).se(-1).se(2).ue(3).se(4).se(-5).se(0)  # POC type 1, 3 offsets
           .ue(4).u(1, 0)  # max_num_ref_frames, gaps
           .ue(44).ue(17)  # 45 macroblocks across, 18 map units (field pairs: 36 MB rows)
           .u(1, 0).u(1, 1).u(1, 1)  # frame_mbs_only 0, mb_adaptive, direct_8x8
           .u(1, 1).ue(1).ue(2).ue(3).ue(4)  # crop: 2 units of 2 across, 4 of 4 down
           .u(1, 0).nal(0x67))
    assert h264_sps_size(sps) == (720 - 2 * 3, 576 - 4 * 7)
    for broken in (sps[:6], sps[:1], b"\x67"):
        with pytest.raises(BitstreamError):
            h264_sps_size(broken)
    invalid_poc = BitWriter().u(8, 66).u(16, 0).ue(0).ue(0).ue(3).nal(0x67)
    with pytest.raises(BitstreamError, match="pic_order_cnt_type"):
        h264_sps_size(invalid_poc)
    assert video_size("h264", SC + invalid_poc) is None
    assert video_size("h264", SC + b"\x68\xeb") is None


def b64(nal: str, padding: bool = True) -> str:
    text = base64.b64encode(bytes.fromhex(nal)).decode()
    return text if padding else text.rstrip("=")


def test_parameter_sets_from_the_fmtp() -> None:
    pps = "68ebe3cb22c0"
    fmtp = {"packetization-mode": "1",
            "Sprop-Parameter-Sets": f"{b64(SPS_HIGH_1080, False)},{b64(pps)},!!notbase64"}
    sets = parameter_sets_from_fmtp("h264", fmtp)
    assert sets == SC + bytes.fromhex(SPS_HIGH_1080) + SC + bytes.fromhex(pps)
    assert video_size("h264", sets) == (1920, 1080)
    vps = "40010c01ffff016000000300900000030000030078959809"
    pps = "4401c172b46240"
    fmtp = {"sprop-vps": b64(vps), "sprop-sps": b64(HEVC_SPS_1080), "sprop-pps": b64(pps)}
    sets = parameter_sets_from_fmtp("hevc", fmtp)
    assert [bytes(n).hex() for n in split_annexb(sets)] == [vps, HEVC_SPS_1080, pps]
    assert video_size("hevc", sets) == (1920, 1080)
    assert parameter_sets_from_fmtp("hevc", {"sprop-parameter-sets": b64(SPS_HIGH_1080)}) == b""
    assert parameter_sets_from_fmtp("mjpeg", fmtp) == b""
    assert video_size("hevc", SC + bytes.fromhex(HEVC_SPS_1080)[:12]) is None


# -- AAC ------------------------------------------------------------------------------------


HBR = {"streamtype": "5", "profile-level-id": "1", "mode": "AAC-hbr", "SizeLength": "13",
       "IndexLength": "3", "IndexDeltaLength": "3"}


@pytest.mark.parametrize(("config", "parsed"), [
    ("1210", AacConfig(2, 44100, 2, 1024)), ("1190", AacConfig(2, 48000, 2, 1024)),
    ("1408", AacConfig(2, 16000, 1, 1024)), ("1214", AacConfig(2, 44100, 2, 960)),
    ("eb098800", AacConfig(2, 48000, 2, 1024))])  # HE-AAC v2: SBR 48 kHz, PS stereo
def test_aac_config(config: str, parsed: AacConfig) -> None:
    assert aac_extradata({**HBR, "config": config.upper()}) == bytes.fromhex(config)
    assert aac_config(bytes.fromhex(config)) == parsed


def test_aac_config_errors() -> None:
    assert aac_extradata(HBR) == b"" and aac_extradata({"config": "12x0"}) == b""
    for bad in (b"", b"\x12", bytes.fromhex("16800000")):  # short; reserved rate index 13
        with pytest.raises(BitstreamError):
            aac_config(bad)


def test_aac_round_trip_through_ffmpeg() -> None:
    encoder: Any = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 44100, "stereo", "fltp"
    encoder.time_base = Fraction(1, 44100)
    encoder.open()
    frames = []
    for i in range(10):
        pcm = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
        for plane in pcm.planes:
            plane.update(struct.pack("<1024f", *(((i * 1024 + n) % 100) / 100 for n in
                                                 range(1024))))
        pcm.sample_rate, pcm.pts = 44100, i * 1024
        frames += [bytes(p) for p in encoder.encode(pcm)]
    fmtp = {**HBR, "config": bytes(encoder.extradata).hex()}
    assert aac_config(aac_extradata(fmtp)) == AacConfig(2, 44100, 2, 1024)
    dep = AacDepacketizer(fmtp)
    out: list[AudioFrame] = []
    for i, data in enumerate(frames):
        (payload,) = AacPacketizer().packetize(
            MediaPacket(False, data, i * 1024, Fraction(1, 44100), False))
        out += dep.push(memoryview(payload.prefix + bytes(payload.body)), 5000 + i * 1024,
                        True, i)
    assert out == [AudioFrame(d, 5000 + i * 1024) for i, d in enumerate(frames)]
    decoder: Any = av.CodecContext.create("aac", "r")
    decoder.extradata = aac_extradata(fmtp)
    decoded = [f for a in out for f in decoder.decode(av.Packet(a.data))]
    assert decoded and all((f.sample_rate, f.layout.nb_channels) == (44100, 2)
                           for f in decoded)


def hbr_packet(*frames: bytes, deltas: tuple[int, ...] = ()) -> memoryview:
    headers = [len(f) << 3 | (deltas[i - 1] if i and deltas else 0)
               for i, f in enumerate(frames)]
    return memoryview(struct.pack(f"!H{len(frames)}H", 16 * len(frames), *headers)
                      + b"".join(frames))


def test_aac_packets_with_one_and_with_three_frames() -> None:
    dep = AacDepacketizer(HBR)
    assert dep.frame_duration == 1024
    assert dep.push(hbr_packet(b"\x21" * 300), 0xFFFFFF00, True, 1) == [
        AudioFrame(b"\x21" * 300, 0xFFFFFF00)]
    one, two, three = b"\x01" * 10, b"\x02" * 200, b"\x03" * 7
    assert dep.push(hbr_packet(one, two, three), 0xFFFFFF00, True, 2) == [
        AudioFrame(one, 0xFFFFFF00), AudioFrame(two, 0x300), AudioFrame(three, 0x700)]
    # interleaving: an index delta of 1 skips one frame duration
    assert [f.timestamp for f in dep.push(hbr_packet(one, two, deltas=(1,)), 0, True, 3)] == [
        0, 2048]
    assert AacDepacketizer({"mode": "aac-hbr", "config": "1214"}).frame_duration == 960
    assert AacDepacketizer({"mode": "AAC-lbr", "constantDuration": "2048"}).frame_duration == 2048
    assert dep.dropped == 0


def test_an_aac_frame_fragmented_over_three_packets() -> None:
    frame = bytes(range(256)) * 12  # 3072 bytes
    header = struct.pack("!HH", 16, len(frame) << 3)
    pieces = [frame[:1000], frame[1000:2000], frame[2000:]]
    dep = AacDepacketizer(HBR)
    out = [f for i, p in enumerate(pieces)
           for f in dep.push(memoryview(header + p), 77, i == 2, 10 + i)]
    assert out == [AudioFrame(frame, 77)]
    out = [f for i, p in enumerate(pieces) if i != 1  # the middle one is lost
           for f in dep.push(memoryview(header + p), 99, i == 2, 20 + i)]
    assert out == [] and dep.dropped == 1
    assert dep.push(hbr_packet(b"\x05" * 9), 1000, True, 23) == [AudioFrame(b"\x05" * 9, 1000)]


def test_broken_aac_packets_never_raise() -> None:
    dep = AacDepacketizer(HBR)
    good = bytes(hbr_packet(b"\x01" * 10, b"\x02" * 20))
    bad = [b"", b"\x00", good[:3], good[:8], struct.pack("!HH", 16, 0),  # zero size
           struct.pack("!H", 0xFFFF) + b"\x00" * 10, good[:-1]]
    for i, packet in enumerate(bad):
        dep.push(memoryview(packet), 0, True, i)
    rng = random.Random(3)
    for seq in range(5000):
        dep.push(memoryview(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 30)))),
                 0, rng.random() < 0.5, seq)
    assert dep.dropped > 0
    odd = AacDepacketizer({"sizelength": "0", "indexlength": "3", "indexdeltalength": "0",
                           "constantsize": "4"})  # index bits only: frames of 4 bytes
    assert [f.data for f in odd.push(memoryview(b"\x00\x03\x00" + b"abcd"), 0, True, 0)] == [
        b"abcd"]
    odd.push(memoryview(b"\x00\x40" + b"\x00" * 8 + b"abcd"), 0, True, 1)  # 64 header bits
    with pytest.raises(ValueError):
        AacDepacketizer({"sizelength": "thirteen"})
    with pytest.raises(ValueError):
        AacDepacketizer({"sizelength": "99"})
