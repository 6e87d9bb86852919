"""Headless Chromium plays the agent's viewer page over WHEP, as a phone on the LAN would.

The agent runs in one network namespace, Chromium in another (FIELD-NOTES: Chromium gathers
no ICE candidates without a non-loopback interface and a default route). Chromium keeps its
host addresses behind mDNS names, like a real browser: the agent must cope with that.
Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import remember
from tests.support.browser import artifact_path, chromium_available, run_in_browser
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")


class NamespacedAgent:
    def __init__(self, pair: NetnsPair, tmp: Path) -> None:
        self.pair = pair
        self.port = 8800
        self.base = f"http://{pair.agent_ip}:{self.port}"
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "agent": {"id": "site1"},
            "http": {"listen": f"{pair.agent_ip}:{self.port}"},
            "cameras": [
                {"id": "lobby", "name": "Lobby", "source": "testsrc://?size=640x360&fps=15"},
                {"id": "yard", "name": "Yard", "source": "testsrc://?size=320x240&fps=15"},
            ],
        }))
        self.env = {**os.environ, "THERELAY_STATE_DIR": str(tmp / "state"),
                    "THERELAY_CONFIG": str(config), "THERELAY_LOG_FORMAT": "json"}
        self.log = (tmp / "agent.log").open("w")
        self.proc = pair.popen(pair.agent_ns, [sys.executable, "-m", "agent", "run"],
                               env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        for _ in range(150):
            done = self.pair.run(self.pair.agent_ns, [
                sys.executable, "-c",
                f"import urllib.request; urllib.request.urlopen('{self.base}/healthz', timeout=1)"],
                capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("the agent did not start in its namespace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "agent", *args], env=self.env, text=True,
                              capture_output=True, timeout=60, check=False)
        remember(done.stdout)
        return done

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    process = NamespacedAgent(netns_pair, tmp_path)
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
