"""Headless Chromium that cannot use WebRTC plays the viewer page over the HLS fallback.

The agent and Chromium run in their own network namespaces (tests/support/netns.py). An
nftables table in the viewer's namespace drops all UDP in and out, as guest Wi-Fi or a
corporate LAN does: the page loads and WHEP is answered (TCP), but ICE can never connect.
The page must give WebRTC up, say that it plays over HLS, and play: ``<video>``'s
currentTime and its presented frames must advance over several seconds. Revoking the token
while HLS plays must end the stream with the page saying why.

Chromium 156 has both MSE and a native HLS player (``canPlayType`` says "maybe"): the page
uses its own MSE player by default, and Chromium's native one with ``#…&hls=native``, so
both paths run here, with the page's Content-Security-Policy enforced (the browser tests
usually bypass it). Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import NamespacedAgent
from tests.support.browser import (
    BrowserReport,
    artifact_path,
    chromium_available,
    run_in_browser,
)
from tests.support.camera import RtspCamera, needs_rtsp_server
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

FPS = 15
WINDOW = 6  # seconds of play measured

FELL_BACK = "Playing over HLS (WebRTC could not connect): a few seconds behind live"
HLS_ONLY = "Playing over HLS (the token does not allow WebRTC): a few seconds behind live"
REVOKED = ("Stream ended. The token was revoked. Ask for a new token (tokens cannot be "
           "un-revoked).")

# Once the tile says it plays over HLS: currentTime and presented frames over WINDOW seconds.
PLAYS = """async () => {
  const video = document.querySelector("video");
  const sample = () => ({ time: video.currentTime, frames: window.__viewer.frames.cam,
                          wall: performance.now() / 1000 });
  const before = sample();
  await new Promise(r => setTimeout(r, WINDOW_MS));
  const after = sample();
  const ranges = video.buffered;
  return { before, after, viewer: window.__viewer, paused: video.paused,
           behind: ranges.length ? ranges.end(ranges.length - 1) - video.currentTime : null,
           size: [video.videoWidth, video.videoHeight] };
}""".replace("WINDOW_MS", str(WINDOW * 1000))


def _playing(text: str) -> str:
    return f"(window.__viewer.cameras.cam || {{}}).text === {json.dumps(text)}"


def _fn(expression: str) -> str:
    """As a function: Playwright evaluates a bare expression with eval, which the page's
    CSP forbids when it is enforced (``keep_csp``)."""
    return f"() => {expression}"


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "cam", "name": "Cam", "source": f"testsrc://?size=640x360&fps={FPS}&gop=1"},
    ])
    yield process
    process.stop()


def _block_udp(pair: NetnsPair) -> None:
    """Drop every UDP packet the viewer namespace sends or receives (ICE, DTLS, RTP)."""
    for rule in (["add", "table", "inet", "noudp"],
                 ["add", "chain", "inet", "noudp", "out",
                  "{ type filter hook output priority 0; }"],
                 ["add", "chain", "inet", "noudp", "in",
                  "{ type filter hook input priority 0; }"],
                 ["add", "rule", "inet", "noudp", "out", "meta", "l4proto", "udp", "drop"],
                 ["add", "rule", "inet", "noudp", "in", "meta", "l4proto", "udp", "drop"]):
        done = pair.run(pair.viewer_ns, ["nft", *rule], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def _audit(agent: NamespacedAgent, *args: str) -> list[dict[str, Any]]:
    done = agent.cli("audit", "--json", "--limit", "1000", *args)
    assert done.returncode == 0, done.stderr
    entries: list[dict[str, Any]] = json.loads(done.stdout)
    return entries


def _check_plays(report: BrowserReport, path: str) -> dict[str, Any]:
    result: dict[str, Any] = report.result
    before, after = result["before"], result["after"]
    played = after["time"] - before["time"]
    wall = after["wall"] - before["wall"]
    frames = after["frames"] - before["frames"]
    print(json.dumps({"path": path, "played_s": round(played, 2), "wall_s": round(wall, 2),
                      "frames": frames, "behind_buffer_end_s": result["behind"],
                      # agent received -> shown (MSE; same clock: one machine); no bound here,
                      # timing goals live in tests/bench
                      "latency_s": result["viewer"]["hls"]["cam"].get("latency"),
                      "hls": result["viewer"]["hls"]["cam"],
                      "failures": result["viewer"]["hlsFailures"]}))
    hls = result["viewer"]["hls"]["cam"]
    assert result["viewer"]["transport"]["cam"] == "hls"
    assert hls["path"] == path and hls["playing"] == path, hls
    assert hls["codecs"].startswith("avc1."), hls
    assert result["size"] == [640, 360]
    assert not result["paused"]
    # frames advance at about real time: no stall longer than a second in the window
    assert played >= wall - 1.0, (played, wall)
    assert frames >= (wall - 1.0) * FPS * 0.8, (frames, wall)
    assert not report.page_errors, report.page_errors
    return result


@pytest.mark.parametrize("path", ["mse", "native"])
def test_udp_blocked_viewer_falls_back_to_hls_and_plays(agent: NamespacedAgent,
                                                         path: str) -> None:
    pair = agent.pair
    _block_udp(pair)
    secret = json.loads(agent.cli("token", "create", "--camera", "cam", "--json").stdout)[
        "token"]
    mode = "&hls=native" if path == "native" else ""
    shot = artifact_path("browser", f"viewer-hls-{path}.png")
    # the page's own CSP enforced: MSE (blob: media) and native (same-origin media) within it
    report = run_in_browser(pair, f"{agent.base}/#token={secret}{mode}", result=PLAYS,
                            wait_for=_fn(_playing(FELL_BACK)), screenshot=shot, timeout=40,
                            keep_csp=True)
    result = _check_plays(report, path)
    # page loaded -> "Playing over HLS": the WebRTC try (ICE gathering up to 2 s, the WHEP
    # answer, 4 s without a picture), then the HLS start
    print(json.dumps({"path": path, "load_to_hls_playing_s": round(
        report.timings["condition"] - report.timings["loaded"], 2)}))
    assert not [line for line in report.console if "Content Security Policy" in line], \
        report.console
    assert result["viewer"]["cameras"]["cam"] == {"text": FELL_BACK, "error": False}
    assert result["viewer"]["sessions"]["cam"] == 1  # one WHEP try, then HLS for good
    assert shot.stat().st_size > 10_000
    # The WHEP session the page gave up was deleted by the page, not left to time out.
    webrtc = [e for e in _audit(agent, "--camera", "cam", "--event", "session.ended")
              if e["protocol"] == "webrtc"]
    assert [e["reason"] for e in webrtc] == ["deleted"], webrtc
    granted = {e["protocol"] for e in _audit(agent, "--camera", "cam", "--event",
                                             "access.granted")}
    assert "hls" in granted, granted


def test_a_token_without_webrtc_plays_hls_at_once_and_revocation_ends_it(
        agent: NamespacedAgent) -> None:
    """A token restricted to hls skips WebRTC (no WHEP request at all). Revoked while HLS
    plays, the page says so within a few seconds and stops."""
    created = json.loads(agent.cli("token", "create", "--camera", "cam", "--protocol", "hls",
                                   "--json").stdout)
    token, token_id = created["token"], created["id"]
    script = (
        "async () => {"
        "  const until = (f) => new Promise(r => { const t = setInterval(() => {"
        "    if (f()) { clearInterval(t); r(); } }, 20); });"
        f"  await until(() => {_playing(HLS_ONLY)} &&"
        "    document.querySelector('video').currentTime > 0);"
        "  const playing = Date.now() / 1000;"
        "  await until(() => (window.__viewer.cameras.cam || {}).error);"
        "  return { ended: Date.now() / 1000, playing, viewer: window.__viewer }; }"
    )
    shot = artifact_path("browser", "viewer-hls-revoked.png")
    reports: list[BrowserReport] = []
    failures: list[BaseException] = []

    def browse() -> None:
        try:
            reports.append(run_in_browser(agent.pair, f"{agent.base}/#token={token}",
                                          result=script, wait_for="true", screenshot=shot,
                                          timeout=45))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    browser = threading.Thread(target=browse)
    browser.start()
    # Revoke once the HLS session has been granted and has played a few seconds.
    deadline = time.monotonic() + 30
    while not any(e["protocol"] == "hls" for e in _audit(agent, "--event", "access.granted")):
        assert time.monotonic() < deadline and browser.is_alive(), failures
        time.sleep(0.5)
    time.sleep(4)
    revoked_at = time.time()
    done = agent.cli("token", "revoke", token_id)
    assert done.returncode == 0, done.stderr
    browser.join(timeout=60)
    assert not failures, failures[0]
    result = reports[0].result
    assert result["viewer"]["cameras"]["cam"] == {"text": REVOKED, "error": True}
    assert result["playing"] < revoked_at  # it played over HLS before the revocation
    assert result["viewer"]["sessions"] == {}  # no WHEP request: the token has no webrtc
    assert result["viewer"]["hls"]["cam"]["playing"] == "mse"
    seconds = result["ended"] - revoked_at
    print(json.dumps({"revocation_to_message_s": round(seconds, 3)}))
    assert 0 < seconds < 3, seconds
    # This token's sessions only (the module's earlier HLS sessions on "cam" end by idle
    # timeout at a time of their own). The daemon writes its audit entries in batches every
    # audit.flush_interval (1 s by default, as here): the entry is looked for that long.
    ended: list[dict[str, Any]] = []
    deadline = time.monotonic() + 3
    while not ended and time.monotonic() < deadline:
        ended = [e for e in _audit(agent, "--token", token_id, "--event", "session.ended")
                 if e["protocol"] == "hls"]
        time.sleep(0.2)
    assert [e["reason"] for e in ended] == ["revoked"], ended


# What this browser can do with H.265 in HLS (MSE or native), and what the tile says.
HEVC_STATE = """() => {
  const codecs = window.__viewer.hls.cam.codecs;
  const probe = document.createElement("video");
  return { viewer: window.__viewer, codecs,
           mse: MediaSource.isTypeSupported(`video/mp4; codecs="${codecs}"`),
           native: probe.canPlayType(`video/mp4; codecs="${codecs}"`),
           time: document.querySelector("video").currentTime };
}"""


@needs_rtsp_server
def test_an_h265_camera_goes_to_hls_and_says_when_the_browser_cannot_decode_it(
        netns_pair: NetnsPair, tmp_path: Path) -> None:
    """WHEP refuses an H.265 camera (501 unsupported_codec); the page then tries HLS, whose
    variant says hvc1. A browser that decodes H.265 (MSE or native) plays it; one that does
    not (Debian's headless Chromium here: no HEVC decoder) says so, naming the ways out."""
    camera = RtspCamera.start(10554, netns=netns_pair.agent_ns, address="127.0.0.1",
                              codec="h265", width=320, height=240, fps=15, gop=15,
                              bitrate=300)
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "cam", "name": "Cam", "source": camera.url},
    ], media={"idle_grace": 60.0})
    try:
        token = json.loads(process.cli("token", "create", "--camera", "cam", "--json").stdout)[
            "token"]
        shot = artifact_path("browser", "viewer-hls-h265.png")
        report = run_in_browser(
            netns_pair, f"{process.base}/#token={token}", result=HEVC_STATE,
            wait_for="(window.__viewer.hls.cam || {}).path !== undefined && "
                     "((window.__viewer.cameras.cam || {}).error || "
                     " (window.__viewer.hls.cam || {}).playing)",
            screenshot=shot, timeout=40)
    finally:
        process.stop()
        camera.stop()
    result = report.result
    viewer = result["viewer"]
    print(json.dumps({"codecs": result["codecs"], "mse": result["mse"],
                      "native": result["native"], "state": viewer["cameras"]["cam"]}))
    assert result["codecs"].startswith(("hvc1.", "hev1.")), result["codecs"]
    assert viewer["sessions"] == {}  # WHEP answered 501: no session was opened
    assert viewer["transport"]["cam"] == "hls"
    if result["mse"] or result["native"]:
        assert viewer["hls"]["cam"]["playing"], viewer
    else:
        assert viewer["hls"]["cam"]["path"] is None
        assert viewer["cameras"]["cam"] == {"error": True, "text": (
            f"This browser cannot play the camera's H.265 video ({result['codecs']}): watch "
            "it over RTSP, or set the camera (or its substream) to H.264.")}
    assert not report.page_errors, report.page_errors
