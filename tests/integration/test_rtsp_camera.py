"""The RTSP camera fixture is a real camera: ffprobe and PyAV read it over RTSP/TCP.

Only 127.0.0.1 is used. Small pictures keep the camera's x264 cheap on a 2-core machine.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import av
import av.error
import pytest

from tests.support.camera import (  # the fixtures: conftest may import them too
    PYAV_RTSP_OPTIONS,
    RtspCamera,
    needs_rtsp_server,
    rtsp_camera_factory_fixture,  # noqa: F401
    rtsp_camera_fixture,  # noqa: F401
)

pytestmark = needs_rtsp_server

Factory = Callable[..., RtspCamera]
SMALL = {"width": 320, "height": 240, "fps": 30}


def ffprobe(url: str, *entries: str) -> list[dict[str, object]]:
    ffprobe_bin = shutil.which("ffprobe")
    assert ffprobe_bin, "ffprobe missing: scripts/setup-system --test installs Debian's ffmpeg"
    result = subprocess.run(
        [
            ffprobe_bin, "-v", "error", "-rtsp_transport", "tcp", "-timeout", "5000000",
            "-show_entries", "stream=" + ",".join(entries), "-of", "json", url,
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    streams: list[dict[str, object]] = json.loads(result.stdout)["streams"]
    return streams


def video_packets(container: av.container.InputContainer) -> Iterator[av.Packet]:
    """Video packets with a timestamp (the RTSP demuxer's first packet has pts None)."""
    for packet in container.demux(video=0):
        if packet.size and packet.pts is not None:
            yield packet


def test_ffprobe_reads_h264_with_the_requested_size(rtsp_camera_factory: Factory) -> None:
    camera = rtsp_camera_factory(width=352, height=288, fps=25, pattern="ball")
    assert camera.url.startswith("rtsp://127.0.0.1:")
    (stream,) = ffprobe(camera.url, "codec_type", "codec_name", "width", "height")
    assert stream == {"codec_type": "video", "codec_name": "h264", "width": 352, "height": 288}


@pytest.mark.parametrize(("audio", "codec"), [("pcmu", "pcm_mulaw"), ("aac", "aac")])
def test_audio_track(rtsp_camera_factory: Factory, audio: str, codec: str) -> None:
    camera = rtsp_camera_factory(**SMALL, audio=audio)
    streams = ffprobe(camera.url, "codec_type", "codec_name")
    assert {"codec_type": "audio", "codec_name": codec} in streams
    assert {"codec_type": "video", "codec_name": "h264"} in streams


def test_pyav_opens_fast_and_sees_keyframes_every_gop(rtsp_camera_factory: Factory) -> None:
    gop, fps = 10, 30
    camera = rtsp_camera_factory(width=320, height=240, fps=fps, gop=gop)
    started = time.monotonic()
    with av.open(camera.url, options=PYAV_RTSP_OPTIONS) as container:
        opened = time.monotonic() - started
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.width, stream.codec_context.height) == (320, 240)
        assert stream.codec_context.extradata, "SPS/PPS should be in the SDP"
        keyframe_pts: list[int] = []
        previous = -1
        for packet in video_packets(container):
            assert packet.pts is not None and packet.pts > previous, "pts must increase"
            previous = packet.pts
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
            if len(keyframe_pts) == 4:
                break
    assert opened < 2.0, f"open took {opened:.3f} s: probing is not disabled"
    time_base = stream.time_base
    assert time_base is not None
    frame_ticks = round(1 / (fps * time_base))
    gaps = [b - a for a, b in itertools.pairwise(keyframe_pts)]
    assert gaps == [gop * frame_ticks] * 3


def test_connected_count_follows_the_client(rtsp_camera: RtspCamera) -> None:
    assert rtsp_camera.connected == 0
    assert rtsp_camera.total_connections == 0
    with av.open(rtsp_camera.url, options=PYAV_RTSP_OPTIONS) as container:
        next(video_packets(container))
        assert rtsp_camera.wait_connected(1)
    assert rtsp_camera.wait_connected(0)
    assert rtsp_camera.total_connections == 1


def test_two_clients_share_the_stream_and_timestamps_keep_increasing(
    rtsp_camera_factory: Factory,
) -> None:
    camera = rtsp_camera_factory(**SMALL, gop=30)
    with av.open(camera.url, options=PYAV_RTSP_OPTIONS) as first:
        first_packets = video_packets(first)
        seen_first = [next(first_packets).pts for _ in range(15)]
        with av.open(camera.url, options=PYAV_RTSP_OPTIONS) as second:
            assert camera.wait_connected(2)
            second_packets = video_packets(second)
            seen_second = []
            # Both read in step for ~1 s; a second PLAY must not rewind the shared pipeline
            # under the first client (the pitfall CLOCK_AND_OFFSET fixes).
            for _ in range(30):
                seen_first.append(next(first_packets).pts)
                seen_second.append(next(second_packets).pts)
    for seen in (seen_first, seen_second):
        assert all(a is not None and b is not None and b > a for a, b in itertools.pairwise(seen))
    # The first client's clock advanced by the frames it read: ~45 frames of 3000 ticks.
    first_span = seen_first[-1] - seen_first[0]  # type: ignore[operator]
    assert 40 * 3000 <= first_span <= 50 * 3000
    assert camera.wait_connected(0)
    assert camera.total_connections == 2


def test_basic_auth(rtsp_camera_factory: Factory) -> None:
    camera = rtsp_camera_factory(**SMALL, user="viewer", password="pa:ss/@word")
    for url in (camera.url, camera.url_with_credentials("viewer", "wrong")):
        with pytest.raises(av.error.HTTPUnauthorizedError):
            av.open(url, options=PYAV_RTSP_OPTIONS)
    with av.open(camera.url_with_credentials(), options=PYAV_RTSP_OPTIONS) as container:
        packet = next(video_packets(container))
        assert packet.size > 0


def test_kill_drops_clients_and_restart_serves_the_same_url(
    rtsp_camera_factory: Factory,
) -> None:
    camera = rtsp_camera_factory(**SMALL)
    url = camera.url
    with av.open(url, options=PYAV_RTSP_OPTIONS) as container:
        packets = video_packets(container)
        next(packets)
        camera.kill()
        assert camera.connected == 0
        started = time.monotonic()
        with pytest.raises((av.error.FFmpegError, StopIteration)):
            for _ in range(10_000):
                next(packets)
        assert time.monotonic() - started < 8, "a dead camera must not hang the reader"
    camera.restart()
    assert camera.url == url
    with av.open(camera.url, options=PYAV_RTSP_OPTIONS) as container:
        assert next(video_packets(container)).size > 0
    assert camera.wait_connected(0)
    assert camera.total_connections == 2
