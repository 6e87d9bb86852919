"""Headless Chromium's Media Source Extensions take the agent's HLS fMP4 and play it: the
init segment and the segments of a session, appended to a SourceBuffer with the CODECS of
the multivariant playlist (as hls.js or the viewer page's fallback does), give a picture of
the camera's size and a clock that advances. The agent and Chromium run in two network
namespaces (tests/support/netns.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agent import NamespacedAgent
from tests.support.browser import artifact_path, chromium_available, run_in_browser
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

MSE = """async () => {
  const base = "%(base)s/hls/cam/";
  const index = await (await fetch(base + "index.m3u8",
                                   {headers: {Authorization: "Bearer %(token)s"}})).text();
  const codecs = /CODECS="([^"]+)"/.exec(index)[1];
  const session = base + index.trim().split("\\n").pop().replace("live.m3u8", "");
  const playlist = await (await fetch(session + "live.m3u8")).text();
  const segments = playlist.split("\\n").filter(line => line.startsWith("seg"));
  const mime = 'video/mp4; codecs="' + codecs + '"';
  const media = new MediaSource();
  const video = document.createElement("video");
  video.muted = true;
  document.body.appendChild(video);
  video.src = URL.createObjectURL(media);
  await new Promise(r => media.addEventListener("sourceopen", r, {once: true}));
  const buffer = media.addSourceBuffer(mime);
  const append = bytes => new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, {once: true});
    buffer.addEventListener("error", reject, {once: true});
    buffer.appendBuffer(bytes);
  });
  await append(await (await fetch(session + "init.mp4")).arrayBuffer());
  for (const name of segments) await append(await (await fetch(session + name)).arrayBuffer());
  video.currentTime = buffer.buffered.start(0);
  await video.play();
  await new Promise(r => setTimeout(r, 1200));
  return {codecs, supported: MediaSource.isTypeSupported(mime), segments: segments.length,
          ranges: buffer.buffered.length, end: buffer.buffered.end(0),
          time: video.currentTime, width: video.videoWidth, height: video.videoHeight,
          error: video.error && video.error.message};
}"""


def test_chromium_mse_plays_the_hls_fmp4(netns_pair: NetnsPair, tmp_path: Path) -> None:
    agent = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "cam", "source": "testsrc://?size=640x360&fps=15&gop=1"}])
    try:
        created = agent.cli("token", "create", "--camera", "cam", "--protocol", "hls", "--json")
        token = json.loads(created.stdout)["token"]
        report = run_in_browser(agent.pair, f"{agent.base}/", result=MSE % {
            "base": agent.base, "token": token}, screenshot=artifact_path("browser",
                                                                           "hls-mse.png"),
            timeout=40)
    finally:
        agent.stop()
    result = report.result
    assert result["supported"] and result["codecs"].startswith("avc1.")
    assert result["segments"] >= 1 and result["ranges"] == 1 and result["end"] >= 1.9
    assert (result["width"], result["height"]) == (640, 360)
    assert result["time"] > 0.5 and result["error"] is None
    assert not report.page_errors
