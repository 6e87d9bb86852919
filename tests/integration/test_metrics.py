"""``/metrics`` of the real daemon: Prometheus text in base units (bytes, seconds), series
only for the protocols the agent serves, one series per state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from agent.access.model import SESSION_PROTOCOLS
from agent.media.hub import CameraState
from agent.relay.link import LinkState
from tests.conftest import write_secret
from tests.support.agent import AgentProcess, WhepViewer
from tests.support.fake_relay import FakeRelay

SMALL = "testsrc://?size=320x240&fps=15&gop=1"
NAMES = {
    "therelay_cameras", "therelay_viewers", "therelay_authorizations_total",
    "therelay_sent_bytes_total", "therelay_camera_received_bytes_total",
    "therelay_camera_received_bytes_per_second", "therelay_event_loop_lag_seconds",
    "therelay_event_loop_lag_max_seconds",
}
RELAY_NAMES = {"therelay_relay_link", "therelay_publish_sessions"}
#: From live WebRTC viewers' RTCP (the agent's send path): one series per camera watched.
WEBRTC_NAMES = {"therelay_webrtc_viewer_loss_ratio", "therelay_webrtc_viewer_jitter_seconds",
                "therelay_webrtc_viewer_rtt_seconds", "therelay_webrtc_retransmitted_packets",
                "therelay_webrtc_keyframe_requests"}


async def scrape(agent: AgentProcess, token: str) -> tuple[dict[str, str], dict[str, float]]:
    """(metric name → type, series → value) of one scrape."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        text = await r.text()
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return types, samples


async def test_metrics_are_in_base_units_for_served_protocols_only(tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [
        {"id": "cam1", "source": SMALL}, {"id": "cam2", "source": SMALL}])
    try:
        _, admin = await agent.token("--admin")
        _, access = await agent.token("--camera", "cam1")
        viewer = WhepViewer(agent.base, "cam1", access, audio=False)
        assert await viewer.connect() == 201
        await viewer.frame()

        for _ in range(150):  # the hub measures over 5 s windows
            _, samples = await scrape(agent, admin)
            if samples['therelay_camera_received_bytes_per_second{camera="cam1"}'] > 0:
                break
            await asyncio.sleep(0.1)
        types, samples = await scrape(agent, admin)
        await viewer.close()
    finally:
        assert await agent.stop() == 0

    assert set(types) == NAMES | WEBRTC_NAMES  # no relay configured: no relay series
    assert 0 <= samples['therelay_webrtc_viewer_loss_ratio{camera="cam1"}'] <= 1
    assert not any(s.endswith('{camera="cam2"}') for s in samples
                   if s.startswith("therelay_webrtc_")), "no viewer of cam2: no series"
    assert all(types[n] == "counter" for n in types if n.endswith("_total"))
    assert all(types[n] == "gauge" for n in types if not n.endswith("_total"))
    # Per-protocol series for the protocols with live sessions, and nothing else.
    protocols = {s.split('protocol="')[1].split('"')[0] for s in samples if "protocol=" in s}
    assert protocols == {p.value for p in SESSION_PROTOCOLS} == {"webrtc", "rtsp", "hls"}
    assert samples['therelay_viewers{camera="cam1",protocol="webrtc"}'] == 1
    assert samples['therelay_viewers{camera="cam2",protocol="webrtc"}'] == 0
    # Every camera state has its series: one camera online, the other idle.
    assert {s for s in samples if s.startswith("therelay_cameras{")} == {
        f'therelay_cameras{{state="{s.value}"}}' for s in CameraState}
    assert samples['therelay_cameras{state="online"}'] == 1
    assert samples['therelay_cameras{state="idle"}'] == 1
    # Bytes, from the pulled camera only. The rate is bytes (not bits) per second: the
    # window it was measured over (5 s or more) holds at least five seconds' worth, and the
    # total since start holds that window.
    total = samples['therelay_camera_received_bytes_total{camera="cam1"}']
    rate = samples['therelay_camera_received_bytes_per_second{camera="cam1"}']
    assert 100 < rate < 1e6
    assert total >= 4 * rate
    assert samples['therelay_camera_received_bytes_total{camera="cam2"}'] == 0
    assert samples['therelay_camera_received_bytes_per_second{camera="cam2"}'] == 0
    assert samples["therelay_sent_bytes_total"] > 1_000
    assert 0 <= samples["therelay_event_loop_lag_seconds"] < 5


async def test_relay_link_state_has_a_series_per_state(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        secret = tmp_path / "publisher-token.secret"
        write_secret(secret, relay.issue_publisher() + "\n")
        agent = await AgentProcess.start(
            tmp_path, [{"id": "cam1", "source": SMALL}],
            relay={"url": relay.url, "publisher_token_file": str(secret)})
        try:
            await relay.wait_agent(timeout=20)
            _, admin = await agent.token("--admin")

            for _ in range(100):
                _, connected = await scrape(agent, admin)
                if connected.get('therelay_relay_link{state="connected"}') == 1:
                    break
                await asyncio.sleep(0.1)
            types, _ = await scrape(agent, admin)
        finally:
            assert await agent.stop() == 0
    assert set(types) == NAMES | RELAY_NAMES
    link = {s: v for s, v in connected.items() if s.startswith("therelay_relay_link{")}
    assert link == {f'therelay_relay_link{{state="{s.value}"}}': float(s is LinkState.CONNECTED)
                    for s in LinkState}
    assert connected["therelay_publish_sessions"] == 0
    assert relay.violations == []
