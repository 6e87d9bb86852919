"""The per-camera RTP packetizer: RFC 6184 (H.264), RFC 7798 (H.265), audio payloads."""

from __future__ import annotations

import struct
from fractions import Fraction

import pytest

from agent.media.rtp import (
    MAX_PAYLOAD,
    PAYLOAD_SIZE,
    AacPacketizer,
    FramePacketizer,
    H264Packetizer,
    H265Packetizer,
    Payload,
    audio_packetizer,
    split_annexb,
    video_packetizer,
)
from agent.media.stream import AudioInfo, MediaPacket, StreamInfo

SC = b"\x00\x00\x00\x01"
SPS = bytes([0x67, 0x42, 0xC0, 0x1E]) + b"\x11" * 10
PPS = bytes([0x68, 0xCE, 0x3C, 0x80])
AUD = bytes([0x09, 0xF0])
VPS5 = bytes([0x40, 0x01]) + b"\x0c" * 20
SPS5 = bytes([0x42, 0x01]) + b"\x01" * 30
PPS5 = bytes([0x44, 0x01]) + b"\xc1" * 5


def nal264(kind: int, size: int, nri: int = 0x60) -> bytes:
    """A NAL unit of ``size`` bytes (header included) with no start-code emulation."""
    return bytes([nri | kind]) + bytes((i % 200) + 1 for i in range(size - 1))


def nal265(kind: int, size: int) -> bytes:
    return bytes([kind << 1, 0x01]) + bytes((i % 200) + 1 for i in range(size - 2))


def video(data: bytes, keyframe: bool, pts: int = 0) -> MediaPacket:
    return MediaPacket(True, data, pts, Fraction(1, 90_000), keyframe)


def raw(payload: Payload) -> bytes:
    return payload.prefix + bytes(payload.body)


def body_of(payloads: tuple[Payload, ...]) -> list[bytes]:
    return [raw(p) for p in payloads]


def test_split_annexb_handles_3_and_4_byte_start_codes_and_trailing_zeros() -> None:
    data = SC + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00" + SC + nal264(5, 20)
    assert [bytes(n) for n in split_annexb(data)] == [SPS, PPS, nal264(5, 20)]
    assert split_annexb(b"") == []


def test_nal_exactly_at_the_payload_size_is_one_single_nal_packet() -> None:
    nal = nal264(1, PAYLOAD_SIZE)
    (only,) = H264Packetizer(b"").packetize(video(SC + nal, False))
    assert raw(only) == nal and only.marker and only.size == PAYLOAD_SIZE


def test_one_byte_over_is_fragmented_into_fu_a_that_reassembles() -> None:
    nal = nal264(1, PAYLOAD_SIZE + 1, nri=0x40)
    payloads = H264Packetizer(b"").packetize(video(SC + nal, False))
    assert len(payloads) == 2
    first, last = body_of(payloads)
    assert first[0] == 0x40 | 28 and last[0] == 0x40 | 28  # FU indicator keeps F and NRI
    assert first[1] == 0x80 | 1 and last[1] == 0x40 | 1  # S on the first, E on the last
    assert all(p.size == len(raw(p)) <= PAYLOAD_SIZE for p in payloads)
    assert bytes([nal[0]]) + first[2:] + last[2:] == nal  # reassembled
    assert [p.marker for p in payloads] == [False, True]


def test_keyframe_gets_sps_pps_in_one_stap_a_first() -> None:
    idr = nal264(5, 3000)
    payloads = H264Packetizer(b"").packetize(video(SC + AUD + SC + SPS + SC + PPS + SC + idr, True))
    stap = raw(payloads[0])
    assert stap[0] & 0x1F == 24 and stap[0] & 0x60 == 0x60  # STAP-A, highest NRI
    assert stap[1:] == struct.pack("!H", len(SPS)) + SPS + struct.pack("!H", len(PPS)) + PPS
    assert all(raw(p)[0] & 0x1F == 28 for p in payloads[1:])  # the IDR, in FU-A
    assert [p.marker for p in payloads].count(True) == 1 and payloads[-1].marker
    assert not any(raw(p)[0] & 0x1F == 9 for p in payloads)  # the AUD is dropped


def test_sps_pps_on_every_keyframe_even_when_the_camera_sends_them_once() -> None:
    packetizer = H264Packetizer(SC + SPS + SC + PPS)  # from the SDP / container
    for pts in (0, 3000, 6000):
        payloads = packetizer.packetize(video(SC + nal264(5, 100), True, pts))
        assert raw(payloads[0])[0] & 0x1F == 24
    delta = packetizer.packetize(video(SC + nal264(1, 100), False))
    assert len(delta) == 1 and raw(delta[0])[0] & 0x1F == 1


def test_parameter_sets_learnt_from_the_stream_replace_older_ones() -> None:
    packetizer = H264Packetizer(SC + SPS + SC + PPS)
    new_sps = SPS[:-1] + b"\x22"
    packetizer.packetize(video(SC + new_sps + SC + PPS + SC + nal264(5, 50), True))
    payloads = packetizer.packetize(video(SC + nal264(5, 50), True))
    assert new_sps in raw(payloads[0])


def test_payloads_are_views_of_the_access_unit_not_copies() -> None:
    data = SC + nal264(1, 5000)
    payloads = H264Packetizer(b"").packetize(video(data, False))
    assert all(isinstance(p.body, memoryview) and p.body.obj is data for p in payloads)


def test_several_nal_units_marker_only_on_the_last() -> None:
    data = SC + nal264(6, 30) + SC + nal264(1, 500) + SC + nal264(1, 500)
    payloads = H264Packetizer(b"").packetize(video(data, False))
    assert [p.marker for p in payloads] == [False, False, True]


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_where_the_source_says_the_units_begin_gives_the_same_payloads(codec: str) -> None:
    """The agent's RTSP client says where each NAL unit begins (no start-code search);
    the payloads are those of the search, for keyframes and other frames alike."""
    if codec == "h264":
        nals = [AUD, SPS, PPS, nal264(6, 30), nal264(5, 5000), nal264(5, PAYLOAD_SIZE)]
        make: type[H264Packetizer | H265Packetizer] = H264Packetizer
    else:
        nals = [VPS5, SPS5, PPS5, nal265(39, 30), nal265(19, 5000), nal265(1, 1)]
        make = H265Packetizer
    data = b"".join(SC + n for n in nals)
    starts = tuple(sum(len(SC + n) for n in nals[:i]) for i in range(len(nals)))
    for keyframe in (True, False):
        searched = make(b"").packetize(video(data, keyframe))
        told = make(b"").packetize(video(data, keyframe)._replace(nals=starts))
        assert body_of(told) == body_of(searched) and len(told) > 5
        assert [p.marker for p in told] == [p.marker for p in searched]
        assert [p.size for p in told] == [len(raw(p)) for p in told]
    one = make(b"").packetize(video(data, False)._replace(nals=(starts[3],)))
    assert body_of(one) != body_of(searched), "the starts given are the ones used"


def test_h265_ap_carries_vps_sps_pps_and_fu_splits_big_units() -> None:
    idr = nal265(19, 2 * PAYLOAD_SIZE)  # IDR_W_RADL
    payloads = H265Packetizer(b"").packetize(
        video(SC + VPS5 + SC + SPS5 + SC + PPS5 + SC + idr, True))
    ap = raw(payloads[0])
    assert (ap[0] >> 1) & 0x3F == 48 and ap[1] == 0x01
    assert ap[2:] == b"".join(struct.pack("!H", len(n)) + n for n in (VPS5, SPS5, PPS5))
    fus = body_of(payloads[1:])
    assert len(fus) == 3 and all((f[0] >> 1) & 0x3F == 49 for f in fus)
    assert fus[0][2] == 0x80 | 19 and fus[-1][2] == 0x40 | 19 and fus[1][2] == 19
    assert idr[:2] + b"".join(f[3:] for f in fus) == idr
    assert all(p.size == len(raw(p)) <= PAYLOAD_SIZE for p in payloads) and payloads[-1].marker


def test_h265_exact_size_single_and_parameter_sets_from_the_stream_info() -> None:
    packetizer = H265Packetizer(SC + VPS5 + SC + SPS5 + SC + PPS5)
    nal = nal265(1, PAYLOAD_SIZE)
    (single,) = packetizer.packetize(video(SC + nal, False))
    assert raw(single) == nal
    key = packetizer.packetize(video(SC + nal265(20, 10), True))
    assert (raw(key[0])[0] >> 1) & 0x3F == 48 and len(key) == 2


def test_oversized_parameter_sets_go_as_single_nal_units() -> None:
    big_sps = bytes([0x67]) + b"\x01" * (PAYLOAD_SIZE - 6)
    payloads = H264Packetizer(b"").packetize(video(SC + big_sps + SC + PPS + SC + nal264(5, 9),
                                                   True))
    assert body_of(payloads)[:2] == [big_sps, PPS]


def test_audio_frames_are_one_payload_each() -> None:
    frame = b"\xff" * 160
    packet = MediaPacket(False, frame, 160, Fraction(1, 8000), False)
    assert body_of(FramePacketizer().packetize(packet)) == [frame]
    assert isinstance(audio_packetizer("PCMU"), FramePacketizer)
    assert isinstance(audio_packetizer("opus"), FramePacketizer)
    assert audio_packetizer("speex") is None


def test_an_audio_frame_no_datagram_can_carry_is_dropped() -> None:
    for size, kept in ((MAX_PAYLOAD, 1), (MAX_PAYLOAD + 1, 0)):
        packet = MediaPacket(False, bytes(size), 0, Fraction(1, 8000), False)
        assert len(FramePacketizer().packetize(packet)) == kept


def test_aac_hbr_au_header_and_adts_stripped() -> None:
    frame_raw = b"\x21\x10" + b"\x05" * 200
    adts = bytes([0xFF, 0xF1, 0x50, 0x80, 0x1A, 0x1F, 0xFC]) + frame_raw  # protection absent
    for frame in (frame_raw, adts):
        (payload,) = AacPacketizer().packetize(MediaPacket(False, frame, 0, Fraction(1, 48000),
                                                           False))
        data = raw(payload)
        assert data[:2] == b"\x00\x10" and struct.unpack("!H", data[2:4])[0] == len(frame_raw) << 3
        assert data[4:] == frame_raw


@pytest.mark.parametrize(("codec", "kind"), [("h264", H264Packetizer), ("hevc", H265Packetizer),
                                             ("mjpeg", type(None))])
def test_video_packetizer_by_codec(codec: str, kind: type) -> None:
    info = StreamInfo(codec, 64, 64, 30.0, b"", AudioInfo("pcm_mulaw", 8000, 1))
    assert isinstance(video_packetizer(info), kind)
