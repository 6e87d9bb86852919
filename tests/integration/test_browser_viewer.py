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
