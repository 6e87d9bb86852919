"""The agent's own WebRTC send path against real aiortc viewers, on loopback: frames of the
right size, the path aiortc used to take still selectable, keyframe on PLI, hostile RTCP."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
)

from tests.support.agent import AgentProcess, WhepViewer, nominate_another_pair

# A 10 s GOP: a keyframe within a second of a PLI can only be the answer to it.
LONG_GOP = "testsrc://?size=320x240&fps=30&gop=10"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    process = asyncio.run(AgentProcess.start(tmp_path_factory.mktemp("agent"), [
        {"id": "cam", "source": LONG_GOP, "always_on": True},
    ]))
    yield process
    assert asyncio.run(process.stop()) == 0


async def frames_for(viewer: WhepViewer, seconds: float) -> list[Any]:
    track = viewer.tracks["video"]
    got = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            got.append(await asyncio.wait_for(track.recv(), left))
        except TimeoutError:
            break
    return got


async def send_rtcp(viewer: WhepViewer, packets: list[bytes]) -> None:
    """Raw RTCP from the viewer's side (SRTCP-protected by its DTLS transport)."""
    dtls = viewer.pc.getReceivers()[0].transport
    for packet in packets:
        await dtls._send_rtp(packet)


def media_ssrc(viewer: WhepViewer) -> int:
    for line in viewer.body.splitlines():
        if line.startswith("a=ssrc:"):
            return int(line.split()[0].split(":")[1])
    raise AssertionError("no ssrc in the answer")


async def test_offers_with_and_without_audio_get_frames_of_the_camera_size(
        agent: AgentProcess) -> None:
    _, token = await agent.token("--camera", "cam")
    for audio in (False, True):
        viewer = WhepViewer(agent.base, "cam", token, audio=audio)
        assert await viewer.connect() == 201, viewer.body
        first = await viewer.frame()
        assert (first.width, first.height) == (320, 240)
        assert len(await frames_for(viewer, 1.0)) >= 20
        await viewer.close()


async def test_a_pli_brings_a_keyframe_long_before_the_camera_sends_one(
        agent: AgentProcess) -> None:
    _, token = await agent.token("--camera", "cam")
    viewer = WhepViewer(agent.base, "cam", token, audio=False)
    assert await viewer.connect() == 201, viewer.body
    await viewer.frame()
    await frames_for(viewer, 1.5)  # past the GOP replay's keyframe
    ssrc = media_ssrc(viewer)
    await send_rtcp(viewer, [bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=ssrc))])
    keyframes = [f for f in await frames_for(viewer, 1.0) if f.key_frame]
    assert keyframes, "no keyframe within 1 s of the PLI (the camera's GOP is 10 s)"
    await viewer.close()


async def test_hostile_rtcp_costs_bounded_work_and_other_viewers_do_not_notice(
        agent: AgentProcess) -> None:
    _, token = await agent.token("--camera", "cam")
    victim = WhepViewer(agent.base, "cam", token, audio=False)
    hostile = WhepViewer(agent.base, "cam", token, audio=False)
    for viewer in (victim, hostile):
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
    ssrc = media_ssrc(hostile)
    junk = [
        b"\x80\xc9\x00\x07" + b"\xff" * 8,  # an RR whose length runs past the datagram
        b"\x81\xcd\x00\x02" + b"\x00" * 8 + b"\x80\xcd\xff\xff",  # compound, truncated 2nd
        b"\x8f\xce\x00\x01\x00\x00\x00\x01",  # a PSFB too short for its media SSRC
    ]
    # 10,000 packets asked for, in datagrams SRTCP can carry (4,000 a NACK with bitmasks)
    nacks = [bytes(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=ssrc,
                                   lost=list(range(start, min(start + 4000, 10_000)))))
             for start in range(0, 10_000, 4000)]
    pli = bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=ssrc))
    await send_rtcp(hostile, junk * 50 + nacks * 20 + [pli] * 500)
    victim_frames = await frames_for(victim, 3.0)
    assert len(victim_frames) >= 3.0 * 30 * 0.9, len(victim_frames)
    assert len(await frames_for(hostile, 1.0)) > 0, "the hostile viewer still plays"
    log = Path(agent.log_path).read_text()
    assert "Traceback" not in log and "webrtc_rtcp_failed" not in log
    for viewer in (victim, hostile):
        await viewer.close()


def lose_rtp(viewer: WhepViewer, keep_one_in: int) -> None:
    """The viewer's network from now on: one RTP packet in ``keep_one_in`` arrives (RTCP,
    DTLS and STUN all do), so aiortc's own receiver reports and NACKs tell the loss."""
    dtls = viewer.pc.getReceivers()[0].transport
    deliver = dtls._handle_rtp_data
    arrived = itertools.count()

    async def lossy(data: bytes, arrival_time_ms: int) -> None:
        if next(arrived) % keep_one_in == 0:
            await deliver(data, arrival_time_ms)

    dtls._handle_rtp_data = lossy  # type: ignore[method-assign]


async def test_a_viewer_losing_most_packets_skips_to_the_next_keyframe(
        agent: AgentProcess) -> None:
    _, token = await agent.token("--camera", "cam")
    viewer = WhepViewer(agent.base, "cam", token, audio=False)
    assert await viewer.connect() == 201, viewer.body
    await viewer.frame()
    await frames_for(viewer, 1.0)
    earlier = len(Path(agent.log_path).read_text())
    lose_rtp(viewer, 3)
    # judged over a second of reports (aiortc sends one every 0.5-1.5 s)
    deadline = time.monotonic() + 10
    while "webrtc_viewer_behind" not in (log := Path(agent.log_path).read_text()[earlier:]):
        assert time.monotonic() < deadline, "two thirds lost, and the agent sent on"
        await asyncio.sleep(0.1)
    assert '"reason": "loss"' in log
    await viewer.close()


async def test_receiver_reports_give_the_viewers_rtt_in_metrics(agent: AgentProcess) -> None:
    _, admin = await agent.token("--admin")
    _, token = await agent.token("--camera", "cam")
    viewer = WhepViewer(agent.base, "cam", token, audio=False)
    assert await viewer.connect() == 201, viewer.body
    await viewer.frame()
    series = 'therelay_webrtc_viewer_rtt_seconds{camera="cam"}'
    rtt = 0.0
    for _ in range(50):  # receiver reports come every second or so, after our first SR
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http, http.get(
                f"{agent.base}/metrics", headers={"Authorization": f"Bearer {admin}"}) as r:
            lines = [line for line in (await r.text()).splitlines()
                     if line.startswith(series)]
        if lines and (rtt := float(lines[0].rsplit(" ", 1)[1])) > 0:
            break
    await viewer.close()
    assert 0 < rtt < 0.5, "the RTT from SR/RR over loopback"


async def test_frames_follow_the_pair_the_viewer_nominates_later(agent: AgentProcess) -> None:
    """A controlling peer may nominate another pair mid-session (a network change): the
    agent's send path moves with ICE's selection. The viewer has two host candidates,
    127.0.0.1 and 127.0.0.2; once frames come on the pair ICE chose, the viewer nominates
    the pair from its other address and closes its old socket: frames must keep coming at
    the camera's rate (without following, none come: the agent sends to the closed port)."""
    _, token = await agent.token("--camera", "cam")
    viewer = WhepViewer(agent.base, "cam", token, audio=False,
                        host_addresses=["127.0.0.1", "127.0.0.2"])
    assert await viewer.connect() == 201, viewer.body
    await viewer.frame()
    assert len(await frames_for(viewer, 1.0)) >= 20
    await nominate_another_pair(viewer.pc.getTransceivers()[0].receiver.transport.transport)
    frames = await frames_for(viewer, 3.0)
    assert len(frames) >= 3.0 * 30 * 0.9, f"{len(frames)} frames in 3 s on the new pair"
    events = [e for e in agent.log_events() if e.get("event") == "webrtc_pair_switched"]
    assert events and events[-1]["camera"] == "cam" and events[-1]["kind"] == "video", events
    assert events[-1]["path"] == "udp", "a host pair: still the agent's own send"
    await viewer.close()


async def test_the_aiortc_send_path_is_still_selectable(tmp_path: Path) -> None:
    process = await AgentProcess.start(tmp_path, [{"id": "cam", "source": LONG_GOP}],
                                       webrtc={"host_addresses": ["127.0.0.1"],
                                               "send_path": "aiortc"})
    try:
        _, token = await process.token("--camera", "cam")
        viewer = WhepViewer(process.base, "cam", token, audio=False)
        assert await viewer.connect() == 201, viewer.body
        assert (await viewer.frame()).width == 320
        await viewer.close()
    finally:
        assert await process.stop() == 0
