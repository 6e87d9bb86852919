"""H.265 over WebRTC: RFC 7798 packetization vectors, a real x265 stream packetized and
depacketized back, the SPS profile/tier/level, and the SDP negotiation (a real Chromium 156
offer, with and without the H265 formats Chrome 136+ adds; a Firefox-style offer)."""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from agent.media.rtp import PAYLOAD_SIZE, H265Packetizer, Payload, split_annexb
from agent.media.stream import MediaPacket
from agent.webrtc import h265, internals
from agent.webrtc.direct import stream_params
from agent.webrtc.rtpsend import RtpStream, StreamParams
from agent.webrtc.tracks import preferences
from tests.support.h265 import depacketize, depayload, isolate_codec_table
from tests.unit.test_webrtc_send import sessions

SC = b"\x00\x00\x00\x01"
DATA = Path(__file__).resolve().parents[1] / "data" / "sdp"


def nal(kind: int, size: int, layer: int = 0, tid: int = 1, f: int = 0) -> bytes:
    """An H.265 NAL unit of ``size`` bytes: header (F, type, LayerId, TID), then no
    start-code emulation."""
    header = bytes([(f << 7) | (kind << 1) | (layer >> 5), ((layer & 0x1F) << 3) | tid])
    return header + bytes((i % 250) + 1 for i in range(size - 2))


VPS, SPS, PPS = nal(32, 24), nal(33, 40), nal(34, 7)
AUD = bytes([0x46, 0x01, 0x10])  # type 35


def au(*nals: bytes) -> bytes:
    return b"".join(SC + n for n in nals)


def packet(data: bytes, keyframe: bool, pts: int = 0) -> MediaPacket:
    return MediaPacket(True, data, pts, Fraction(1, 90_000), keyframe)


def raw(p: Payload) -> bytes:
    return p.prefix + bytes(p.body)


# -- RFC 7798 packetization vectors ---------------------------------------------------------

def test_vps_sps_pps_go_in_one_aggregation_packet_with_exact_header_bytes() -> None:
    idr = nal(19, 300)
    payloads = H265Packetizer(b"").packetize(packet(au(AUD, VPS, SPS, PPS, idr), True))
    ap = raw(payloads[0])
    # §4.4.2 payload header: F=0, Type=48, LayerId=0, TID=1 → 0x60 0x01
    assert ap[:2] == b"\x60\x01"
    assert ap[2:] == (b"\x00\x18" + VPS + b"\x00\x28" + SPS + b"\x00\x07" + PPS)
    assert raw(payloads[1]) == idr  # §4.4.1 single NAL unit packet: the unit itself
    assert [p.marker for p in payloads] == [False, True]  # AUD dropped, marker on the last


def test_the_aggregation_header_takes_the_or_of_f_and_the_lowest_layer_and_tid() -> None:
    vps, sps, pps = nal(32, 10, tid=2), nal(33, 10, tid=3, f=1), nal(34, 10, tid=1)
    ap = raw(H265Packetizer(b"").packetize(packet(au(vps, sps, pps, nal(19, 20)), True))[0])
    assert ap[0] == 0x80 | (48 << 1) and ap[1] == 0x01  # F set; TID 1 the lowest


def test_a_single_parameter_set_is_not_an_aggregation_packet() -> None:
    """§4.4.2: an AP carries two or more aggregation units."""
    payloads = H265Packetizer(b"").packetize(packet(au(SPS, nal(19, 20)), True))
    assert [raw(p) for p in payloads] == [SPS, nal(19, 20)]


def test_a_nal_unit_exactly_at_the_payload_size_is_one_single_nal_unit_packet() -> None:
    unit = nal(1, PAYLOAD_SIZE)
    (only,) = H265Packetizer(b"").packetize(packet(au(unit), False))
    assert raw(only) == unit and only.marker and only.size == PAYLOAD_SIZE


def test_one_byte_over_is_two_fragmentation_units_with_s_and_e() -> None:
    unit = nal(1, PAYLOAD_SIZE + 1, layer=0x21, tid=2, f=1)
    first, last = H265Packetizer(b"").packetize(packet(au(unit), False))
    a, b = raw(first), raw(last)
    # §4.4.3 payload header: Type=49, F/LayerId/TID copied: F=1, LayerId 0x21, TID 2
    assert a[:2] == b[:2] == bytes([0x80 | (49 << 1) | 1, (0x01 << 3) | 2])
    assert a[2] == 0x80 | 1 and b[2] == 0x40 | 1  # FU header: S|type, E|type
    assert len(a) == PAYLOAD_SIZE and len(b) == 3 + (PAYLOAD_SIZE + 1 - 2 - (PAYLOAD_SIZE - 3))
    assert unit[:2] + a[3:] + b[3:] == unit
    assert (first.marker, last.marker) == (False, True)
    assert depayload(a) + depayload(b) == SC + unit


def test_middle_fragments_have_neither_s_nor_e() -> None:
    unit = nal(19, 4 * PAYLOAD_SIZE)
    payloads = H265Packetizer(b"").packetize(packet(au(unit), False))
    headers = [raw(p)[2] for p in payloads]
    assert headers[0] == 0x80 | 19 and headers[-1] == 0x40 | 19
    assert all(h == 19 for h in headers[1:-1])
    assert len(headers) == -(-(len(unit) - 2) // (PAYLOAD_SIZE - 3)) == 5
    assert all(p.size <= PAYLOAD_SIZE for p in payloads)


def test_rtp_timestamps_sequence_numbers_and_marker_per_access_unit() -> None:
    """Every packet of an access unit has its timestamp; the next one 3000 ticks (30 fps)
    later; sequence numbers run on; M only on each access unit's last packet."""
    tx, rx = sessions()
    stream = RtpStream(StreamParams(ssrc=0x01020304, payload_type=49, clock=90_000,
                                    cname="c"), tx)
    packetizer = H265Packetizer(b"")
    sent = []
    for i, (data, key) in enumerate([(au(VPS, SPS, PPS, nal(19, 3000)), True),
                                     (au(nal(1, 500)), False)]):
        sent += [(i, rx.unprotect(d)) for d in stream.frame(
            packetizer.packetize(packet(data, key)), i * 3000)]
    headers = [(i, *struct.unpack("!BBHII", d[:12])) for i, d in sent]
    stamps = {i: {h[4] for h in headers if h[0] == i} for i in (0, 1)}
    assert all(len(s) == 1 for s in stamps.values())
    assert (stamps[1].pop() - stamps[0].pop()) % (1 << 32) == 3000
    seqs = [h[3] for h in headers]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(seqs))
    markers = [(h[0], bool(h[2] & 0x80)) for h in headers]
    assert markers == [(0, False)] * 3 + [(0, True), (1, True)]  # AP + 3 FUs, 1 single
    assert {h[2] & 0x7F for h in headers} == {49}


def x265_access_units(frames: int = 12) -> list[tuple[bytes, bool]]:
    """A real x265 stream (noise, so keyframes span many packets), Annex-B access units."""
    encoder: Any = av.CodecContext.create("libx265", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"x265-params": "log-level=error:keyint=6:bframes=0"}
    out = []
    for i in range(frames + 1):
        frame = None
        if i < frames:
            frame = av.VideoFrame(320, 240, "yuv420p")
            for plane in frame.planes:
                plane.update(os.urandom(plane.buffer_size))
            frame.pts = i
        out += [(bytes(p), bool(p.is_keyframe)) for p in encoder.encode(frame)]
    return out


def test_a_real_x265_stream_depacketizes_to_the_same_units_and_decodes() -> None:
    units = x265_access_units()
    assert units[0][1] and len(units) == 12
    packetizer = H265Packetizer(b"")
    decoder: Any = av.CodecContext.create("hevc", "r")
    decoded = 0
    fragmented = False
    for data, key in units:
        payloads = packetizer.packetize(packet(data, key))
        assert all(p.size <= PAYLOAD_SIZE for p in payloads) and payloads[-1].marker
        fragmented |= any((raw(p)[0] >> 1) & 0x3F == 49 for p in payloads)
        back = depacketize([raw(p) for p in payloads])
        want = [bytes(n) for n in split_annexb(data) if (n[0] >> 1) & 0x3F != 35]
        assert [bytes(n) for n in split_annexb(back)] == want
        decoded += len(decoder.decode(av.Packet(back)))
    decoded += len(decoder.decode(None))
    assert fragmented and decoded == len(units)
    profile = h265.find_profile(units[0][0])
    assert profile is not None and profile.profile_id == 1 and profile.tier == 0
    assert 1 in profile.compatible and 30 <= profile.level_id <= 93


# -- SPS profile_tier_level -------------------------------------------------------------------

def sps(profile: int, tier: int, level: int, compatible: tuple[int, ...]) -> bytes:
    flags = sum(1 << (31 - j) for j in compatible)
    ptl = bytes([(tier << 5) | profile]) + flags.to_bytes(4, "big") + b"\x90" + b"\x00" * 5
    # 00 00 00 in the constraint flags: an emulation prevention byte as an encoder writes it
    body = b"\x01" + ptl + bytes([level]) + b"\xa0\x03\xc0\x80"
    escaped = body.replace(b"\x00\x00\x00", b"\x00\x00\x03\x00")
    return nal(33, 2)[:2] + escaped


def test_the_sps_gives_profile_tier_level_with_emulation_prevention_removed() -> None:
    found = h265.sps_profile(sps(2, 1, 153, (1, 2)))
    assert found == h265.ProfileTierLevel(0, 1, 2, frozenset({1, 2}), 153)
    assert h265.sps_profile(PPS) is None and h265.sps_profile(SPS[:5]) is None


# -- SDP negotiation ---------------------------------------------------------------------------

CHROME_H265 = [  # what Chrome 136+ adds where it has an H.265 decoder (libwebrtc's format)
    (51, 52, "level-id=180;profile-id=1;tier-flag=0;tx-mode=SRST"),
    (53, 54, "level-id=180;profile-id=2;tier-flag=0;tx-mode=SRST"),
]


def chromium_offer(h265_formats: list[tuple[int, int, str]] | None = None) -> str:
    """The offer headless Chromium 156 made here (recvonly video + audio; it has no H.265
    decoder, so no H265), with ``h265_formats`` added to its video section as Chrome
    writes them (payload type, RTX payload type, fmtp)."""
    sdp = (DATA / "chromium156-offer.sdp").read_bytes().decode()
    if not h265_formats:
        return sdp
    lines = sdp.split("\r\n")
    video = next(i for i, line in enumerate(lines) if line.startswith("m=video"))
    lines[video] += "".join(f" {pt} {rtx}" for pt, rtx, _ in h265_formats)
    at = next(i for i, line in enumerate(lines) if line.startswith("a=rtpmap:118 red"))
    added = []
    for pt, rtx, fmtp in h265_formats:
        added += [f"a=rtpmap:{pt} H265/90000", f"a=rtcp-fb:{pt} goog-remb",
                  f"a=rtcp-fb:{pt} transport-cc", f"a=rtcp-fb:{pt} ccm fir",
                  f"a=rtcp-fb:{pt} nack", f"a=rtcp-fb:{pt} nack pli", f"a=fmtp:{pt} {fmtp}",
                  f"a=rtpmap:{rtx} rtx/90000", f"a=fmtp:{rtx} apt={pt}"]
    return "\r\n".join(lines[:at] + added + lines[at:])


FIREFOX_OFFER = "\r\n".join([
    "v=0", "o=mozilla...THIS_IS_SDPARTA-128.0 1 0 IN IP4 0.0.0.0", "s=-", "t=0 0",
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=group:BUNDLE 0",
    "a=ice-options:trickle", "a=msid-semantic:WMS *",
    "m=video 9 UDP/TLS/RTP/SAVPF 120 124 121 125 126 127 97 98 105 106",
    "c=IN IP4 0.0.0.0", "a=recvonly", "a=ice-pwd:" + "b" * 32, "a=ice-ufrag:abcd",
    "a=mid:0", "a=rtcp-mux", "a=setup:actpass",
    "a=rtpmap:120 VP8/90000", "a=rtpmap:124 rtx/90000", "a=fmtp:124 apt=120",
    "a=rtpmap:121 VP9/90000", "a=rtpmap:125 rtx/90000", "a=fmtp:125 apt=121",
    "a=rtpmap:126 H264/90000",
    "a=fmtp:126 profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=1",
    "a=rtpmap:127 rtx/90000", "a=fmtp:127 apt=126",
    "a=rtpmap:97 H264/90000",
    "a=fmtp:97 profile-level-id=42e01f;level-asymmetry-allowed=1",
    "a=rtpmap:98 rtx/90000", "a=fmtp:98 apt=97",
    "a=rtpmap:105 H264/90000",
    "a=fmtp:105 profile-level-id=42001f;level-asymmetry-allowed=1;packetization-mode=1",
    "a=rtpmap:106 rtx/90000", "a=fmtp:106 apt=105",
    "a=rtcp-fb:126 nack", "a=rtcp-fb:126 nack pli", "a=rtcp-fb:126 ccm fir", "",
])

MAIN = h265.ProfileTierLevel(0, 0, 1, frozenset({1, 2}), 120)
MAIN10 = h265.ProfileTierLevel(0, 0, 2, frozenset({2}), 153)


def chosen(offer: str, camera: h265.ProfileTierLevel | None) -> list[tuple[Any, ...]]:
    return [(c.mimeType, c.payloadType, c.parameters)
            for c in h265.choose(h265.offered_formats(offer), camera)]


def test_h265_offered_or_not() -> None:
    assert h265.offers_h265(chromium_offer(CHROME_H265))
    assert not h265.offers_h265(chromium_offer())
    assert not h265.offers_h265(FIREFOX_OFFER)
    assert h265.choose(h265.offered_formats(FIREFOX_OFFER), MAIN) == []


def test_a_main_camera_gets_chromes_profile_1_format_with_its_own_level() -> None:
    assert chosen(chromium_offer(CHROME_H265), MAIN) == [
        ("video/H265", 51, {"profile-id": 1, "tier-flag": 0, "level-id": 120,
                            "tx-mode": "SRST"}),
        ("video/rtx", 52, {"apt": 51})]


def test_a_main_10_camera_gets_the_profile_2_format() -> None:
    assert chosen(chromium_offer(CHROME_H265), MAIN10)[0][1:] == (
        53, {"profile-id": 2, "tier-flag": 0, "level-id": 153, "tx-mode": "SRST"})


def test_a_main_camera_may_go_in_a_main_10_format_its_sps_declares_compatible() -> None:
    only_main10 = chromium_offer(CHROME_H265[1:])
    assert chosen(only_main10, MAIN)[0][1:] == (
        53, {"profile-id": 2, "tier-flag": 0, "level-id": 120, "tx-mode": "SRST"})
    assert chosen(chromium_offer(CHROME_H265[:1]), MAIN10) == []  # not the other way round


def test_high_tier_other_tx_modes_and_malformed_values_are_not_chosen() -> None:
    high = h265.ProfileTierLevel(0, 1, 1, frozenset({1}), 150)
    assert chosen(chromium_offer(CHROME_H265), high) == []
    odd = [(51, 52, "level-id=180;profile-id=x;tier-flag=0"),
           (53, 54, "profile-id=1;tx-mode=MRST"), (55, 56, "profile-id=1")]
    assert chosen(chromium_offer(odd), MAIN) == [
        ("video/H265", 55, {"profile-id": 1, "tier-flag": 0, "level-id": 120}),
        ("video/rtx", 56, {"apt": 55})]


def test_without_the_cameras_sps_the_first_offered_format_is_answered_as_offered() -> None:
    assert chosen(chromium_offer(CHROME_H265), None)[0][1:] == (
        51, {"profile-id": 1, "tier-flag": 0, "level-id": 180, "tx-mode": "SRST"})


def video_lines(sdp: str) -> list[str]:
    lines = sdp.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("m=video"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")),
               len(lines))
    return lines[start:end]


@pytest.fixture(autouse=True)
def _codec_table(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_codec_table(monkeypatch)  # the H265 entry registered here stays in this test


async def answer(offer: str, codec: str, camera: h265.ProfileTierLevel | None = MAIN) -> str:
    """aiortc's answer as the agent makes it (agent/webrtc/session.py, direct.py)."""
    internals.register_h265()
    pc = RTCPeerConnection()
    try:
        video = pc.addTransceiver("video", direction="sendonly")
        video.setCodecPreferences(preferences("video", codec))
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        if codec == "H265":
            internals.set_codecs(video, h265.choose(h265.offered_formats(offer), camera))
        made = await pc.createAnswer()
        return made.sdp
    finally:
        await pc.close()


async def test_the_answer_to_chrome_names_the_h265_format_and_what_is_sent() -> None:
    offer = chromium_offer(CHROME_H265)
    sdp = await answer(offer, "H265")
    lines = video_lines(sdp)
    assert lines[0].split()[3:] == ["51", "52"]
    assert "a=rtpmap:51 H265/90000" in lines
    assert "a=fmtp:51 profile-id=1;tier-flag=0;level-id=120;tx-mode=SRST" in lines
    assert "a=fmtp:52 apt=51" in lines and "a=rtcp-fb:51 nack pli" in lines
    assert "a=rtcp-fb:51 transport-cc" not in lines  # the agent does not act on it
    params = stream_params(sdp, sdp, "0", 90_000)
    assert (params.payload_type, params.rtx_payload_type) == (51, 52)


async def test_an_h264_camera_answers_chrome_in_h264_even_when_h265_is_offered() -> None:
    for offer in (chromium_offer(CHROME_H265), FIREFOX_OFFER):
        lines = video_lines(await answer(offer, "H264"))
        assert not any("H265" in line for line in lines)
        assert any(line.endswith(" H264/90000") for line in lines)


def test_refusals_name_the_fallbacks() -> None:
    for why in (h265.NO_H265_OFFERED, h265.AIORTC_PATH, h265.no_fit(MAIN10)):
        message = h265.refusal("door", why)
        assert "/hls/door/index.m3u8" in message and "H.264" in message
        assert "RTSP" in message and why in message


@pytest.mark.parametrize("junk", ["v=0\r\nm=video 9 X 96\r\na=rtpmap:96\r\n", "v=0\r\nm=\r\n"])
def test_a_broken_offer_is_an_offer_error_not_an_exception(junk: str) -> None:
    from agent.webrtc.offer import OfferError
    with contextlib.suppress(OfferError):  # a clear 400, or nothing offered: no traceback
        assert isinstance(h265.offered_formats(junk), list)


def test_a_camera_above_the_offered_level_is_answered_with_its_own_level_and_logged() -> None:
    from structlog.testing import capture_logs

    big = h265.ProfileTierLevel(0, 0, 1, frozenset({1, 2}), 186)
    with capture_logs() as logs:
        got = chosen(chromium_offer(CHROME_H265), big)
    assert got[0][2]["level-id"] == 186  # what is sent, not the offer's 180
    assert [e["event"] for e in logs] == ["h265_level_above_offer"]
    assert logs[0]["camera_level"] == 186 and logs[0]["offered_level"] == 180
