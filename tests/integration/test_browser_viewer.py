"""Headless Chromium plays the agent's viewer page over WHEP, as a phone on the LAN would.

The agent runs in one network namespace, Chromium in another (docs/field-notes.md: Chromium gathers
no ICE candidates without a non-loopback interface and a default route). Chromium keeps its
host addresses behind mDNS names, like a real browser: the agent must cope with that.
Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.http import tls
from tests.support.agent import NamespacedAgent
from tests.support.browser import (
    BrowserFailed,
    artifact_path,
    chromium_available,
    run_in_browser,
)
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "lobby", "name": "Lobby", "source": "testsrc://?size=640x360&fps=15"},
        {"id": "yard", "name": "Yard", "source": "testsrc://?size=320x240&fps=15"},
    ])
    yield process
    process.stop()


def test_chromium_plays_every_camera_in_scope(agent: NamespacedAgent) -> None:
    created = agent.cli("token", "create", "--host", "--json")
    token = json.loads(created.stdout)["token"]
    shot = artifact_path("browser", "viewer-playing.png")
    report = run_in_browser(
        agent.pair, f"{agent.base}/#token={token}", result="window.__viewer",
        wait_for="window.__viewer.frames.lobby > 20 && window.__viewer.frames.yard > 20",
        screenshot=shot, timeout=30)
    viewer = report.result
    assert viewer["frames"]["lobby"] > 20 and viewer["frames"]["yard"] > 20
    assert viewer["cameras"]["lobby"] == {"text": "live", "error": False}
    assert shot.stat().st_size > 10_000
    assert not report.page_errors


def test_revoking_the_token_stops_the_video_and_says_why(agent: NamespacedAgent) -> None:
    created = json.loads(agent.cli("token", "create", "--camera", "yard", "--json").stdout)
    token, token_id = created["token"], created["id"]
    script = (
        "async () => {"
        "  const until = (f) => new Promise(r => { const t = setInterval(() => {"
        "    if (f()) { clearInterval(t); r(); } }, 50); });"
        "  await until(() => (window.__viewer.frames.yard || 0) > 10);"
        "  window.__ready = true;"
        "  await until(() => (window.__viewer.cameras.yard || {}).error);"
        "  return window.__viewer; }"
    )
    revoker = subprocess.Popen(
        [sys.executable, "-c",
         "import time, subprocess, sys; time.sleep(6); "
         f"subprocess.run([sys.executable, '-m', 'agent', 'token', 'revoke', '{token_id}'])"],
        env=agent.env, stdout=subprocess.DEVNULL)
    shot = artifact_path("browser", "viewer-revoked.png")
    report = run_in_browser(agent.pair, f"{agent.base}/#token={token}", result=script,
                            wait_for="true", screenshot=shot, timeout=40)
    revoker.wait(timeout=30)
    state = report.result["cameras"]["yard"]
    assert state["error"] and state["text"] == (
        "Stream ended. The token was revoked. Ask for a new token (tokens cannot be "
        "un-revoked).")
    assert list(report.result["frames"]) == ["yard"]  # a camera token sees one camera


def test_a_bad_token_gets_a_clear_message(agent: NamespacedAgent) -> None:
    shot = artifact_path("browser", "viewer-bad-token.png")
    report = run_in_browser(agent.pair, f"{agent.base}/#token=tra_not-a-token",
                            result="document.getElementById('notice').textContent",
                            wait_for="window.__viewer.error", screenshot=shot, timeout=15)
    assert report.result.startswith("This is not a TheRelay token")


def test_chromium_plays_over_https_trusting_the_certificate_by_its_key(
        netns_pair: NetnsPair, tmp_path: Path) -> None:
    """Chromium trusts the self-signed certificate only through its key's SHA-256 (what an
    installer pins); with another certificate's hash it refuses the page."""
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "lobby", "name": "Lobby", "source": "testsrc://?size=640x360&fps=15"},
    ], tls={"self_signed": True})
    try:
        assert process.base.startswith("https://")
        cert = tls.describe(*tls.self_signed_paths(process.state_dir))
        token = json.loads(process.cli("token", "create", "--host", "--json").stdout)["token"]
        shot = artifact_path("browser", "viewer-https.png")
        report = run_in_browser(
            netns_pair, f"{process.base}/#token={token}",
            result="({...window.__viewer, protocol: location.protocol, "
                   "secure: window.isSecureContext})",
            wait_for="window.__viewer.frames.lobby > 20", screenshot=shot, timeout=30,
            chromium_args=[f"--ignore-certificate-errors-spki-list={cert.spki_sha256}"])
        viewer = report.result
        assert viewer["frames"]["lobby"] > 20  # the WHEP flow ran over HTTPS
        assert viewer["protocol"] == "https:" and viewer["secure"] is True
        assert not report.page_errors
        other = tls.ensure_self_signed(tmp_path / "other", "impostor", [netns_pair.agent_ip])
        with pytest.raises(BrowserFailed, match="ERR_CERT"):
            run_in_browser(
                netns_pair, f"{process.base}/#token={token}", result="window.__viewer",
                timeout=10,
                chromium_args=[f"--ignore-certificate-errors-spki-list={other.spki_sha256}"])
    finally:
        process.stop()


@pytest.fixture
def ice_blocked_agent(netns_pair: NetnsPair, tmp_path: Path):
    """An agent whose only ICE candidate is its own loopback address: the answer reaches
    Chromium, but no media path can ever connect (ICE blocked, as behind a strict firewall).
    Its own handshake deadline is long, so only the page's DELETEs can end the sessions."""
    process = NamespacedAgent(netns_pair, tmp_path, [
        {"id": "lobby", "name": "Lobby", "source": "testsrc://?size=320x240&fps=15"},
    ], webrtc={"host_addresses": ["127.0.0.1"]}, sessions={"handshake_timeout": 60})
    yield process
    process.stop()


def _audit(agent: NamespacedAgent, *args: str) -> list[dict[str, object]]:
    done = agent.cli("audit", "--json", "--limit", "1000", *args)
    assert done.returncode == 0, done.stderr
    entries: list[dict[str, object]] = json.loads(done.stdout)
    return entries


def test_a_viewer_that_cannot_connect_deletes_its_sessions(
        ice_blocked_agent: NamespacedAgent) -> None:
    """The page used to leak one session every ~15 s while ICE failed, kept after the browser
    closed. Now it gives up after 10 s and DELETEs the session, and deletes the one it holds
    when the page goes away (pagehide): every session it opened is ended, none by timeout."""
    agent = ice_blocked_agent
    # webrtc only: a token that allows hls would make the page fall back to HLS instead of
    # trying WebRTC again (test_browser_hls.py)
    token = json.loads(agent.cli("token", "create", "--camera", "lobby", "--protocol",
                                 "webrtc", "--json").stdout)["token"]
    # Once the second session is open (the first given up after 10 s and deleted), the page
    # goes away: its pagehide handler runs (dispatched here: the driver closes the browser
    # right after, before a real navigation could send anything) and DELETEs that one.
    leave = ("async () => { const seen = JSON.parse(JSON.stringify(window.__viewer));"
             " window.dispatchEvent(new PageTransitionEvent('pagehide'));"
             " await new Promise(r => setTimeout(r, 1000)); return seen; }")
    report = run_in_browser(agent.pair, f"{agent.base}/#token={token}", result=leave,
                            wait_for="(window.__viewer.sessions.lobby || 0) >= 2", timeout=40)
    assert "live" not in json.dumps(report.result)
    health = agent.pair.run(agent.pair.agent_ns, [sys.executable, "-c", (
        "import json, urllib.request; print(json.load(urllib.request.urlopen("
        f"'{agent.base}/healthz', timeout=5))['sessions'])")], capture_output=True, text=True)
    assert health.stdout.strip() == "0", health
    ended = _audit(agent, "--camera", "lobby", "--event", "session.ended")
    assert len(ended) >= 2
    assert {e["reason"] for e in ended} == {"deleted"}  # by the page, not by a deadline
