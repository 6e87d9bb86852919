"""The hand-written fMP4 boxes (agent/hls/fmp4.py) and the LL-HLS segmenter, on streams
encoded here by x264/x265 (PyAV), read back by FFmpeg (ffprobe/ffmpeg) and by a box walker."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from agent.hls import fmp4
from agent.hls.segmenter import Segmenter

W, H, FPS = 160, 96, 15


def encode(codec: str, frames: int, gop: int, options: dict[str, str] | None = None,
           ) -> list[tuple[bytes, bool]]:
    """``frames`` Annex-B access units of a moving picture, a keyframe every ``gop``."""
    ctx: Any = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = Fraction(FPS)
    ctx.gop_size = gop
    ctx.max_b_frames = 0
    ctx.options = options or {}
    out: list[tuple[bytes, bool]] = []
    for i in range(frames + 1):
        frame = None
        if i < frames:
            frame = av.VideoFrame(W, H, "yuv420p")
            for n, plane in enumerate(frame.planes):
                plane.update(bytes([(i * 7 + n * 40) % 256]) * plane.buffer_size)
            frame.pts = i
        out += [(bytes(p), p.is_keyframe) for p in ctx.encode(frame)]
    return out


@pytest.fixture(scope="module")
def h264() -> list[tuple[bytes, bool]]:
    return encode("libx264", 45, 15, {"bf": "0", "aud": "1"})


@pytest.fixture(scope="module")
def hevc() -> list[tuple[bytes, bool]]:
    return encode("libx265", 45, 15, {"x265-params": "log-level=error:bframes=0:keyint=15"})


def boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    out = []
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        assert size >= 8 and start + size <= end, (kind, size)
        out.append((kind, start + 8, start + size))
        start += size
    assert start == end
    return out


def tree(data: bytes, start: int = 0, end: int | None = None) -> dict[bytes, object]:
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"mvex", b"moof",
                  b"traf"}
    return {kind: tree(data, s, e) if kind in containers else data[s:e]
            for kind, s, e in boxes(data, start, end)}


def stream(codec: str, units: list[tuple[bytes, bool]], per_fragment: int = 5) -> bytes:
    track = fmp4.video_track(codec, W, H, units[0][0])
    data, base = fmp4.init_segment(track), 0
    for n, i in enumerate(range(0, len(units), per_fragment)):
        chunk = units[i:i + per_fragment]
        samples = [fmp4.Sample(fmp4.length_prefixed(codec, d), 6000, k) for d, k in chunk]
        data += fmp4.fragment(n + 1, base, samples)
        base += 6000 * len(chunk)
    return data


def probe(path: Path) -> dict[str, object]:
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                           "stream=codec_name,codec_tag_string,width,height,nb_read_frames,"
                           "profile,r_frame_rate", "-of", "json", str(path)],
                          capture_output=True, text=True, timeout=60, check=True)
    streams: list[dict[str, object]] = json.loads(done.stdout)["streams"]
    assert len(streams) == 1
    return streams[0]


# -- NAL units ---------------------------------------------------------------------------------


def test_split_nals_takes_both_start_code_lengths() -> None:
    data = b"\x00\x00\x00\x01\x67AB\x00\x00\x01\x68C\x00\x00\x00\x01\x65DEF\x00"
    assert fmp4.split_nals(data) == [b"\x67AB", b"\x68C", b"\x65DEF\x00"]
    assert fmp4.split_nals(b"") == []


def test_samples_are_length_prefixed_without_aud_or_parameter_sets(
        h264: list[tuple[bytes, bool]], hevc: list[tuple[bytes, bool]]) -> None:
    for codec, units, dropped in (("h264", h264, {7, 8, 9}), ("hevc", hevc, {32, 33, 34, 35})):
        keyframe = units[0][0]
        assert dropped & {fmp4.nal_type(codec, n) for n in fmp4.split_nals(keyframe)}
        sample, pos, kinds = fmp4.length_prefixed(codec, keyframe), 0, []
        while pos < len(sample):
            (size,) = struct.unpack_from(">I", sample, pos)
            kinds.append(fmp4.nal_type(codec, sample[pos + 4:pos + 5]))
            pos += 4 + size
        assert pos == len(sample) and kinds and not dropped & set(kinds)


# -- codec configuration -------------------------------------------------------------------------


def test_avcc_from_the_sps(h264: list[tuple[bytes, bool]]) -> None:
    track = fmp4.video_track("h264", W, H, h264[0][0])
    sps = next(n for n in fmp4.split_nals(h264[0][0]) if n[0] & 0x1F == 7)
    assert track.codec_string == f"avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}"
    box = track.config_box
    assert box[4:8] == b"avcC" and box[8] == 1 and box[9:12] == sps[1:4]
    assert box[12] == 0xFF and box[13] == 0xE1  # 4-byte lengths, one SPS
    assert box[16:16 + len(sps)] == sps
    if sps[1] == 100:  # High: chroma 4:2:0 and 8-bit depths follow the PPS
        assert box[-4:] == bytes([0xFD, 0xF8, 0xF8, 0])


def test_hvcc_from_the_vps_sps_pps(hevc: list[tuple[bytes, bool]]) -> None:
    track = fmp4.video_track("hevc", W, H, hevc[0][0])
    nals = {fmp4.nal_type("hevc", n): n for n in fmp4.split_nals(hevc[0][0])}
    sps = fmp4.parse_hevc_sps(nals[33])
    assert (sps.profile_space, sps.tier, sps.profile_idc) == (0, 0, 1)  # Main
    assert sps.compatibility & (1 << 30)  # general_profile_compatibility_flag[1]
    assert (sps.chroma_format_idc, sps.bit_depth_luma_minus8) == (1, 0)
    assert (sps.width, sps.height) == (W, H)
    assert re.fullmatch(rf"hvc1\.1\.6\.L{sps.level_idc}(\.[0-9A-F]{{1,2}})*", track.codec_string)
    box = track.config_box
    assert box[4:8] == b"hvcC" and box[8] == 1 and box[9] == 1
    assert struct.unpack_from(">I", box, 10)[0] == sps.compatibility
    assert box[14:20] == sps.constraints and box[20] == sps.level_idc
    assert box[21:24] == b"\xf0\x00\xfc"  # no spatial segmentation or parallelism info
    assert box[24:27] == b"\xfd\xf8\xf8"  # 4:2:0, 8-bit luma and chroma
    assert box[29] & 3 == 3 and box[30] == 3  # 4-byte lengths; VPS, SPS, PPS arrays
    for kind in (32, 33, 34):
        assert nals[kind] in box


def test_the_out_of_band_parameter_sets_serve_when_the_keyframe_lacks_them(
        h264: list[tuple[bytes, bool]]) -> None:
    keyframe = h264[0][0]
    sets = b"".join(b"\x00\x00\x00\x01" + n for n in fmp4.split_nals(keyframe)
                    if n[0] & 0x1F in (7, 8))
    bare = b"".join(b"\x00\x00\x00\x01" + n for n in fmp4.split_nals(keyframe)
                    if n[0] & 0x1F not in (7, 8))
    assert fmp4.video_track("h264", W, H, bare, sets) == fmp4.video_track("h264", W, H, keyframe)
    with pytest.raises(fmp4.Fmp4Error, match="no SPS/PPS"):
        fmp4.video_track("h264", W, H, bare)
    with pytest.raises(fmp4.Fmp4Error, match=r"H\.264 or H\.265 only"):
        fmp4.video_track("mjpeg", W, H, bare)


def test_every_pps_id_is_kept_and_in_band_sets_win(h264: list[tuple[bytes, bool]]) -> None:
    keyframe = h264[0][0]
    nals = fmp4.split_nals(keyframe)
    sps = next(n for n in nals if n[0] & 0x1F == 7)
    pps = next(n for n in nals if n[0] & 0x1F == 8)
    other_id = b"\x68\x50\x80"  # pic_parameter_set_id ue(v) '010' = 1
    same_id = b"\x68\xff\x00"  # id '1' = 0, other bytes: loses to the in-band PPS 0
    sdp = b"".join(b"\x00\x00\x00\x01" + n for n in (sps, same_id, other_id))
    box = fmp4.video_track("h264", W, H, keyframe, sdp).config_box
    pos = 14  # after the header, version, profile, compat, level, lengthSize, SPS count
    assert box[13] & 0x1F == 1
    pos += 2 + struct.unpack_from(">H", box, pos)[0]
    assert box[pos] == 2  # two PPS
    first = struct.unpack_from(">H", box, pos + 1)[0]
    assert box[pos + 3:pos + 3 + first] == pps
    second_at = pos + 3 + first
    assert box[second_at + 2:second_at + 2 + len(other_id)] == other_id


# -- boxes -----------------------------------------------------------------------------------


def test_init_segment_layout(h264: list[tuple[bytes, bool]]) -> None:
    init = tree(fmp4.init_segment(fmp4.video_track("h264", W, H, h264[0][0])))
    assert list(init) == [b"ftyp", b"moov"]
    moov = init[b"moov"]
    assert isinstance(moov, dict) and list(moov) == [b"mvhd", b"trak", b"mvex"]
    trak = moov[b"trak"]
    assert isinstance(trak, dict)
    mdia = trak[b"mdia"]
    assert isinstance(mdia, dict)
    mdhd = mdia[b"mdhd"]
    assert isinstance(mdhd, bytes) and struct.unpack_from(">I", mdhd, 12)[0] == 90_000
    tkhd = trak[b"tkhd"]
    assert isinstance(tkhd, bytes) and struct.unpack_from(">II", tkhd, 76) == (W << 16, H << 16)
    mvex = moov[b"mvex"]
    assert isinstance(mvex, dict) and struct.unpack_from(">II", mvex[b"trex"], 4) == (1, 1)


def test_fragment_layout() -> None:
    samples = [fmp4.Sample(b"\x00\x00\x00\x02AB", 6000, True),
               fmp4.Sample(b"\x00\x00\x00\x01C", 3000, False)]
    data = fmp4.fragment(7, 123_456_789_012, samples)
    top = boxes(data)
    assert [k for k, _, _ in top] == [b"moof", b"mdat"]
    moof = tree(data)[b"moof"]
    assert isinstance(moof, dict)
    assert struct.unpack(">II", moof[b"mfhd"]) == (0, 7)
    traf = moof[b"traf"]
    assert isinstance(traf, dict)
    assert struct.unpack(">II", traf[b"tfhd"]) == (0x020000, 1)  # default-base-is-moof
    assert struct.unpack(">IQ", traf[b"tfdt"]) == (0x01000000, 123_456_789_012)
    trun = traf[b"trun"]
    flags, count, offset = struct.unpack_from(">IIi", trun)
    assert (flags, count) == (0x000701, 2)
    assert offset == top[1][1]  # the first sample's bytes: just after mdat's header
    assert struct.unpack_from(">6I", trun, 12) == (6000, 6, fmp4.SYNC_FLAGS,
                                                   3000, 5, fmp4.NON_SYNC_FLAGS)
    assert data[offset:] == b"".join(s.data for s in samples)


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_ffmpeg_reads_and_decodes_init_and_fragments(
        codec: str, h264: list[tuple[bytes, bool]], hevc: list[tuple[bytes, bool]],
        tmp_path: Path) -> None:
    units = h264 if codec == "h264" else hevc
    path = tmp_path / f"{codec}.mp4"
    path.write_bytes(stream(codec, units))
    info = probe(path)
    assert info["codec_name"] == codec and info["codec_tag_string"] in ("avc1", "hvc1")
    assert (info["width"], info["height"]) == (W, H)
    assert int(str(info["nb_read_frames"])) == len(units) == 45
    assert info["r_frame_rate"] == "15/1"
    done = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null",
                           "-"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    with av.open(str(path)) as container:  # PyAV too: every frame decodes, in order
        frames = [f.pts or 0 for f in container.decode(video=0)]
    assert frames == sorted(frames) and len(frames) == 45


# -- the segmenter -------------------------------------------------------------------------------


def feed(segmenter: Segmenter, frames: int, gop: int = 15, fps: int = FPS,
         start: float = 1_800_000_000.0) -> None:
    step = 90_000 // fps
    for i in range(frames):
        segmenter.push(bytes(100), i * step, i % gop == 0, start + i / fps)


def test_parts_and_segments() -> None:
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=3, max_bytes=10**9)
    feed(s, 15 * 9 + 1)  # 9 s of a 1 s GOP, and the next keyframe
    assert [seg.msn for seg in s.complete] == [1, 2, 3]  # 3 kept of 4
    for seg in s.complete:
        assert seg.duration == pytest.approx(2.0)
        assert seg.data is not None and seg.data[4:8] == b"moof"
    parts = s.complete[-1].parts
    assert all(p.duration <= 0.5 + 1e-9 for p in parts)
    assert parts[0].independent and not any(p.independent for p in parts[1:])
    assert sum(p.duration for p in parts) == pytest.approx(2.0)
    assert s.complete[0].parts[0].data == b""  # bytes of unlisted parts dropped
    assert s.complete[-1].parts[0].data != b""
    assert s.complete[1].program_date == pytest.approx(s.complete[0].program_date + 2.0)


def test_a_part_is_published_when_its_last_frame_arrives() -> None:
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=3, max_bytes=10**9)
    published = [s.push(bytes(10), i * 6000, i % 15 == 0, 0.0) for i in range(40)]
    # 7 frames of 1/15 s fit in 0.5 s: parts end with frames 6, 13, 20 and 27 as they
    # arrive; frames 28-29 end the segment, which only the keyframe at 30 can tell; 36.
    assert [i for i, p in enumerate(published) if p] == [6, 13, 20, 27, 30, 36]


def test_decode_times_follow_the_camera_despite_jitter() -> None:
    """Frames arrive with uneven timestamps: the parts' tfdt and durations stay continuous
    and end where the camera's timestamps say, whatever the early estimates were."""
    import random

    rng = random.Random(3)
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=10, max_bytes=10**9)
    dts, stamps = 0, []
    for i in range(15 * 9 + 1):
        stamps.append(dts)
        s.push(bytes(10), dts, i % 15 == 0, 0.0)
        dts += 6000 + rng.randint(-1500, 1500)
    expected = stamps[0]
    for segment in s.complete:
        assert segment.data is not None
        for kind, start, end in boxes(segment.data):
            if kind != b"moof":
                continue
            traf = tree(segment.data, start, end)[b"traf"]
            assert isinstance(traf, dict)
            (base,) = struct.unpack_from(">Q", traf[b"tfdt"], 4)
            assert base == expected  # continuous
            trun = traf[b"trun"]
            (count,) = struct.unpack_from(">I", trun, 4)
            durations = struct.unpack_from(f">{3 * count}I", trun, 12)[::3]
            assert all(d > 0 for d in durations)
            expected += sum(durations)
    # the last complete segment ends at the keyframe that began the next one, give or take
    # the frame whose estimate the next frame corrects
    last_key = stamps[15 * 8]
    assert abs(expected - last_key) <= 1500


def test_a_long_gop_makes_long_segments_and_the_target_duration_follows() -> None:
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=5, max_bytes=10**9)
    feed(s, 15 * 8 + 1, gop=60)  # keyframes every 4 s
    assert [seg.duration for seg in s.complete] == [pytest.approx(4.0)] * 2
    assert s.target_duration() == 4
    assert "#EXT-X-TARGETDURATION:4" in s.playlist()


def test_memory_is_bounded_by_bytes() -> None:
    s = Segmenter(part_target=0.5, segment_target=1.0, max_segments=50, max_bytes=4000)
    feed(s, 15 * 20 + 1)
    assert sum(seg.size for seg in s.complete) <= 4000 + s.complete[-1].size
    assert len(s.complete) < 5


def test_playlist_text() -> None:
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=6, max_bytes=10**9)
    feed(s, 15 * 4 + 8)  # segments 0 and 1, then a part of segment 2
    lines = s.playlist().splitlines()
    assert lines[:7] == ["#EXTM3U", "#EXT-X-VERSION:9", "#EXT-X-TARGETDURATION:2",
                         "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.500",
                         "#EXT-X-PART-INF:PART-TARGET=0.500", "#EXT-X-MEDIA-SEQUENCE:0",
                         '#EXT-X-MAP:URI="init.mp4"']
    assert lines[7] == "#EXT-X-PROGRAM-DATE-TIME:2027-01-15T08:00:00.000Z"
    assert lines[8:10] == ["#EXTINF:2.00000,", "seg0.m4s"]  # no parts for older segments
    assert lines[11] == '#EXT-X-PART:DURATION=0.46667,URI="part1.0.m4s",INDEPENDENT=YES'
    assert "#EXTINF:2.00000," in lines and "seg1.m4s" in lines
    assert lines[-2] == '#EXT-X-PART:DURATION=0.46667,URI="part2.0.m4s",INDEPENDENT=YES'
    assert lines[-1] == '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part2.1.m4s"'
    assert s.playlist_bytes() is s.playlist_bytes()  # made once per publication
    assert s.playlist_bytes().decode() == s.playlist()
    for i in range(68, 76):  # 8 more frames: the next part is published
        s.push(bytes(100), i * 6000, i % 15 == 0, 1_800_000_000.0 + i / FPS)
    assert s.playlist_bytes().decode() == s.playlist() and "part2.1.m4s" in s.playlist()


def test_blocking_reload_positions() -> None:
    s = Segmenter(part_target=0.5, segment_target=2.0, max_segments=6, max_bytes=10**9)
    assert not s.has(0, None) and not s.has(0, 0)
    feed(s, 15 * 4 + 8)  # segment 2 has one part
    assert s.has(1, None) and not s.has(2, None)
    assert s.has(2, 0) and not s.has(2, 1)
    assert s.has(1, 2) and s.has(1, 99) is s.has(2, 0)  # past a segment's end: the next
    assert s.has(0, 0)  # gone from the window: answered at once with the playlist
    assert not s.too_far(2, 1) and not s.too_far(2, 3) and s.too_far(2, 4)
    assert not s.too_far(3, None) and not s.too_far(3, 2) and s.too_far(3, 3)
    assert s.too_far(4, None) and s.too_far(4, 0) and s.too_far(2, 1_000_000)
    assert s.part(2, 0) is not None and s.part(2, 1) is None and s.part(0, 0) is None


async def test_waiting_for_a_publication() -> None:
    """The muxer's wait: woken by a publication, bounded by its timeout, one future each."""
    from agent.hls.muxer import HlsMuxer

    class Hub:
        camera_id = "cam"

    muxer = HlsMuxer(Hub(), part_target=0.5, segment_target=2.0,  # type: ignore[arg-type]
                     max_segments=3, max_bytes=10**6)
    flag = {"ready": False}
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await muxer.wait(lambda: flag["ready"], 0.05)
    assert 0.04 < loop.time() - started < 0.2
    waiters = [asyncio.ensure_future(muxer.wait(lambda: flag["ready"], 5)) for _ in range(20)]
    await asyncio.sleep(0)
    muxer._notify()  # a publication that does not satisfy them: they wait on
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag["ready"] = True
    muxer._notify()
    assert all(await asyncio.gather(*waiters))
