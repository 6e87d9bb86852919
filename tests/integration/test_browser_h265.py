"""Headless Chromium against an H.265 camera over WHEP, in network namespaces.

The browser's own offer decides: where Chromium lists H265 in
``RTCRtpReceiver.getCapabilities('video')`` (a build and device with an HEVC decoder), the
agent must answer H.265 and Chromium must decode frames; where it does not (Debian's
Chromium 156 here, headless, no GPU: docs/field-notes.md), its offer has no H265 and the
agent must refuse with a 501 that names the HLS URL and the H.264 substream. The report
says which of the two was exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agent import NamespacedAgent
from tests.support.browser import chromium_available, run_in_browser
from tests.support.media import write_clip
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

PROBE = """async () => {
  const caps = RTCRtpReceiver.getCapabilities('video').codecs
    .filter(c => /h265/i.test(c.mimeType)).map(c => c.sdpFmtpLine || '');
  const pc = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(done => {
    if (pc.iceGatheringState === 'complete') done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && done();
    setTimeout(done, 3000);
  });
  const offer = pc.localDescription.sdp;
  const response = await fetch('/whep/hevc', {method: 'POST', body: offer,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer TOKEN'}});
  const body = await response.text();
  let frames = 0, codec = null;
  if (response.status === 201) {
    await pc.setRemoteDescription({type: 'answer', sdp: body});
    await new Promise(done => setTimeout(done, 6000));
    for (const s of (await pc.getStats()).values()) {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames = s.framesDecoded || 0;
      if (s.type === 'codec' && /h265/i.test(s.mimeType)) codec = s.mimeType;
    }
  }
  pc.close();
  return {caps, offered: /H265\\/90000/i.test(offer), status: response.status, body,
          frames, codec};
}"""


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    clip = write_clip(tmp_path / "hevc.mp4", "libx265", 320, 240, fps=15, frames=45,
                      options={"x265-params": "log-level=error:keyint=15"})
    clip.chmod(0o644)
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "hevc", "source": f"file://{clip}", "always_on": True},
    ])
    yield process
    process.stop()


def test_chromium_gets_h265_if_it_offers_it_else_a_501_naming_the_fallbacks(
        agent: NamespacedAgent) -> None:
    created = agent.cli("token", "create", "--camera", "hevc", "--json")
    secret = json.loads(created.stdout)["token"]
    report = run_in_browser(agent.pair, f"{agent.base}/healthz",
                            result=PROBE.replace("TOKEN", secret), timeout=30)
    got = report.result
    print(json.dumps({k: got[k] for k in ("caps", "offered", "status", "frames", "codec")}))
    if got["caps"]:  # this Chromium can decode H.265: the whole WebRTC path
        assert got["offered"] and got["status"] == 201, got["body"]
        assert got["codec"] and got["frames"] >= 15, got
    else:  # no decoder: no H265 in its offer, and the refusal says what to do instead
        assert not got["offered"] and got["status"] == 501, got["body"]
        body = json.loads(got["body"])
        assert body["error"] == "unsupported_codec", body
        message = body["message"]
        assert "/hls/hevc/index.m3u8" in message and "substream to H.264" in message
        assert "offer has no H265" in message
