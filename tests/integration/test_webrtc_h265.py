"""H.265 over WebRTC end to end, on loopback: a GStreamer x265 RTSP camera, the agent, and
aiortc viewers — one that offers H265 (depacketizer + FFmpeg hevc decoder from
tests/support/h265.py) gets decoded frames; one that does not gets a 501 naming HLS, RTSP
and an H.264 substream. The agent's aiortc send path refuses H.265 the same way, and an
H.265 camera is not published to the relay (WHIP)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCConfiguration

from agent.config import CameraConfig
from agent.media.hub import CameraHub
from agent.media.sources import make_source
from agent.webrtc.whip import WhipError, WhipPublisher
from tests.integration.test_webrtc_media import frames_for
from tests.support.agent import AgentProcess, WhepViewer
from tests.support.camera import RtspCamera, needs_rtsp_server
from tests.support.h265 import enable_h265_receiving
from tests.support.media import write_clip

pytestmark = needs_rtsp_server

W, H = 320, 240


@pytest.fixture(scope="module")
def cameras() -> Iterator[dict[str, RtspCamera]]:
    cams = {"hevc": RtspCamera.start(width=W, height=H, fps=15, gop=15, bitrate=300,
                                     codec="h265"),
            "avc": RtspCamera.start(width=W, height=H, fps=15, gop=15, bitrate=300)}
    try:
        yield cams
    finally:
        for cam in cams.values():
            cam.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory,
          cameras: dict[str, RtspCamera]) -> Iterator[AgentProcess]:
    process = asyncio.run(AgentProcess.start(tmp_path_factory.mktemp("h265"), [
        {"id": "hevc", "source": cameras["hevc"].url},
        {"id": "avc", "source": cameras["avc"].url},
    ], media={"camera_timeout": 5.0, "idle_grace": 30.0}))
    yield process
    assert asyncio.run(process.stop()) == 0


def video_formats(answer: str) -> list[str]:
    return [line for line in answer.splitlines()
            if line.startswith(("a=rtpmap:", "a=fmtp:")) and "opus" not in line.lower()
            and "PCM" not in line]


async def test_a_viewer_offering_h265_gets_h265_frames_of_the_camera(
        agent: AgentProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    enable_h265_receiving(monkeypatch)
    _, token = await agent.token("--camera", "hevc")
    viewer = WhepViewer(agent.base, "hevc", token, audio=False)
    assert await viewer.connect() == 201, viewer.body
    formats = video_formats(viewer.body)
    assert any(line.endswith(" H265/90000") for line in formats), formats
    fmtp = next(line for line in formats if "profile-id=" in line)
    # x265 through GStreamer: Main profile, Main tier; the level is the camera's own
    assert "profile-id=1;tier-flag=0;level-id=" in fmtp, fmtp
    assert not any("H264" in line for line in formats)
    first = await viewer.frame(timeout=10.0)
    assert (first.width, first.height) == (W, H)
    frames = await frames_for(viewer, 3.0)
    assert len(frames) >= 3.0 * 15 * 0.7, len(frames)  # the camera's 15 fps, decoded
    assert all((f.width, f.height) == (W, H) for f in frames)
    stamps = [f.pts for f in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    await viewer.close()


async def test_an_h264_camera_stays_h264_for_a_viewer_that_offers_h265(
        agent: AgentProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    enable_h265_receiving(monkeypatch)
    _, token = await agent.token("--camera", "avc")
    viewer = WhepViewer(agent.base, "avc", token, audio=False)
    assert await viewer.connect() == 201, viewer.body
    formats = video_formats(viewer.body)
    assert any(" H264/90000" in line for line in formats)
    assert not any("H265" in line for line in formats)
    first = await viewer.frame(timeout=10.0)
    assert (first.width, first.height) == (W, H)
    await viewer.close()


async def test_a_viewer_without_h265_gets_a_501_naming_the_fallbacks_every_time(
        agent: AgentProcess) -> None:
    """More refusals than the per-address cap of connecting sessions (8): each 501 gives
    its admission back (they were kept before, and the 9th offer got a 429)."""
    _, token = await agent.token("--camera", "hevc")
    for _ in range(10):
        viewer = WhepViewer(agent.base, "hevc", token, audio=False)
        assert await viewer.connect() == 501, viewer.body
        await viewer.close()
    assert "unsupported_codec" in viewer.body
    assert "/hls/hevc/index.m3u8" in viewer.body and "H.264" in viewer.body
    assert "RTSP" in viewer.body and "offer has no H265" in viewer.body
    log = agent.log_path.read_text()
    assert "Traceback" not in log and token not in log


async def test_the_aiortc_send_path_refuses_h265_and_says_what_to_set(
        tmp_path_factory: pytest.TempPathFactory, cameras: dict[str, RtspCamera],
        monkeypatch: pytest.MonkeyPatch) -> None:
    enable_h265_receiving(monkeypatch)
    process = await AgentProcess.start(tmp_path_factory.mktemp("h265aiortc"), [
        {"id": "hevc", "source": cameras["hevc"].url}],
        media={"camera_timeout": 5.0},
        webrtc={"host_addresses": ["127.0.0.1"], "send_path": "aiortc"})
    try:
        _, token = await process.token("--camera", "hevc")
        viewer = WhepViewer(process.base, "hevc", token, audio=False)
        assert await viewer.connect() == 501, viewer.body
        await viewer.close()
        assert "send_path" in viewer.body and "/hls/hevc/index.m3u8" in viewer.body
    finally:
        assert await process.stop() == 0


async def test_an_h265_camera_is_not_published_to_the_relay(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """WHIP: refused before anything is offered or sent (the URL is never contacted)."""
    clip = write_clip(tmp_path_factory.mktemp("whip") / "hevc.mp4", "libx265", 160, 120,
                      fps=10, frames=10, options={"x265-params": "log-level=error"})
    config = CameraConfig(id="gate", source=f"file://{clip}")
    hub = CameraHub("gate", lambda: make_source(config, 2.0), idle_grace=0.3,
                    always_on=False, gop_cache=True, queue_packets=100, reconnect_max=1.0)
    publisher = WhipPublisher(hub, "http://127.0.0.1:9/whip", "unused",
                              RTCConfiguration(iceServers=[]))
    try:
        with pytest.raises(WhipError) as caught:
            await publisher.start(timeout=5.0)
        assert caught.value.code == "unsupported_codec"
        assert "H.265" in str(caught.value) and "substream to H.264" in str(caught.value)
        assert publisher.pc is None  # nothing was negotiated
    finally:
        await publisher.stop()
        await hub.close()


CHROMIUM = Path(__file__).resolve().parents[1] / "data" / "sdp" / "chromium156-offer.sdp"


def offer_with(lines: list[str], formats: str) -> str:
    """The real Chromium 156 offer (tests/data/sdp) with H265 lines put in its video section."""
    sdp = CHROMIUM.read_bytes().decode().split("\r\n")
    video = next(i for i, line in enumerate(sdp) if line.startswith("m=video"))
    sdp[video] += f" {formats}"
    at = next(i for i, line in enumerate(sdp) if line.startswith("a=rtpmap:118 red"))
    return "\r\n".join(sdp[:at] + lines + sdp[at:])


@pytest.mark.parametrize(("lines", "formats", "status", "says"), [
    (["a=rtpmap:51 H265/90000", "a=fmtp:51 profile-id=99999999999999999999;tier-flag=0"],
     "51", 501, "none of the H265 formats"),
    (["a=rtpmap:51 H265/90000", "a=fmtp:51 level-id=;profile-id=;tier-flag=x"],
     "51", 501, "none of the H265 formats"),
    (["a=rtpmap:51 H265/90000", "a=fmtp:77 profile-id=1"], "51", 400, "offer"),
    (["a=rtpmap:51 H265/90000", "a=fmtp:51 profile-id=1;tier-flag=1;level-id=186"],
     "51", 201, "a=fmtp:51 profile-id=1;tier-flag=1;level-id="),  # High tier takes Main
    (["a=rtpmap:51 H265/90000"], "51", 201, "a=fmtp:51 profile-id=1;tier-flag=0;level-id="),
    ([f"a=rtpmap:{pt} H265/90000" for pt in range(50, 64)]
     + [f"a=fmtp:{pt} profile-id=7" for pt in range(50, 64)],
     " ".join(str(pt) for pt in range(50, 64)), 501, "none of the H265 formats"),
])
async def test_odd_h265_offers_get_a_clear_answer_never_a_500(
        agent: AgentProcess, lines: list[str], formats: str, status: int, says: str) -> None:
    _, token = await agent.token("--camera", "hevc")
    async with aiohttp.ClientSession() as http, http.post(
            f"{agent.base}/whep/hevc", data=offer_with(lines, formats),
            headers={"Authorization": f"Bearer {token}",
                     "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        location = response.headers.get("Location")
    assert response.status == status, body
    assert says in body
    if location:  # the session was answered (no ICE will follow): end it
        async with aiohttp.ClientSession() as http, http.delete(
                agent.base + location, headers={"Authorization": f"Bearer {token}"}) as done:
            assert done.status == 200
    assert "Traceback" not in agent.log_path.read_text()
