"""Headless Chromium on a lossy link: the agent's NACK answers and keyframes keep it playing.

The agent and Chromium run in their own network namespaces (tests/support/netns.py); an
nftables rule in the agent's namespace drops 2 % of the UDP it sends, i.e. of the media on
its way to the viewer (the kernel here has no ``sch_netem`` for ``tc netem``). Chromium's own
getStats() must show NACKs it sent, packets it got retransmitted, frames decoded at the
camera rate and no freeze; the agent must never skip to a keyframe (``webrtc_viewer_behind``):
2 % loss is what NACK repairs. A failure prints the window's counts and the agent's skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agent import NamespacedAgent
from tests.support.browser import chromium_available, run_in_browser
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

FPS = 30
PLAY = 20  # seconds of play before the measured window
WINDOW = 8  # seconds measured

STATS = """async () => {
  const pc = window.__viewer.pcs.cam;
  const inbound = async () => {
    for (const s of (await pc.getStats()).values()) {
      if (s.type === "inbound-rtp" && s.kind === "video") return s;
    }
    return null;
  };
  const before = await inbound();
  await new Promise(r => setTimeout(r, WINDOW_MS));
  const after = await inbound();
  return { before, after };
}""".replace("WINDOW_MS", str(WINDOW * 1000))


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "cam", "source": f"testsrc://?size=640x360&fps={FPS}&gop=2",
         "always_on": True},
    ])
    yield process
    process.stop()


def test_chromium_plays_through_2_percent_loss_with_nacks_answered(
        agent: NamespacedAgent) -> None:
    pair = agent.pair
    # 2 % of the agent's outgoing UDP (the media) dropped at random by nftables in the
    # agent's namespace: the browser sees the gaps and asks again (RFC 4585 generic NACK).
    for rule in (["add", "table", "inet", "loss"],
                 ["add", "chain", "inet", "loss", "out",
                  "{ type filter hook output priority 0; }"],
                 ["add", "rule", "inet", "loss", "out", "meta", "l4proto", "udp",
                  "numgen", "random", "mod", "100", "<", "2", "drop"]):
        done = pair.run(pair.agent_ns, ["nft", *rule], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    secret = json.loads(agent.cli("token", "create", "--camera", "cam", "--json").stdout)["token"]
    report = run_in_browser(
        pair, f"{agent.base}/#token={secret}", result=STATS,
        wait_for=f"window.__viewer.frames.cam > {PLAY * FPS * 0.8}", timeout=PLAY + 40)
    before, after = report.result["before"], report.result["after"]
    seconds = (after["timestamp"] - before["timestamp"]) / 1000  # getStats times, in ms
    fps = (after["framesDecoded"] - before["framesDecoded"]) / seconds
    # What a failure needs to explain itself: the window's counts, and the agent's skips.
    window = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "framesDecoded", "framesDropped", "keyFramesDecoded", "freezeCount",
        "totalFreezesDuration", "nackCount", "retransmittedPacketsReceived", "packetsLost",
        "packetsReceived", "pliCount")}
    skips = [line for line in agent.log_path.read_text().splitlines()
             if "webrtc_viewer_behind" in line]
    explained = {"fps": round(fps, 2), "seconds": round(seconds, 2), "window": window,
                 "whole play": {k: after.get(k) for k in (
                     "nackCount", "retransmittedPacketsReceived", "pliCount", "freezeCount",
                     "totalFreezesDuration", "framesDropped")},
                 "skips": skips}
    assert after["nackCount"] > 0, explained
    assert after["retransmittedPacketsReceived"] > 0, explained
    assert fps >= FPS * 0.9, explained
    assert window["freezeCount"] == 0, explained
    assert not skips, explained
    print(json.dumps(explained))
