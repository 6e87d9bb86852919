"""Discovery end to end, in two network namespaces: find → adopt → watch → the camera moves.

The camera side (the pair's viewer namespace) runs real peers: Debian's GStreamer RTSP server
as the camera's stream, the test ONVIF device replaying a Hikvision's answers with real
WS-Security checks (tests/support/onvif_device.py), and the `WSDiscovery` package's publisher
announcing it. The agent daemon and its CLI run in the agent namespace. A WHEP viewer (aiortc)
runs on the camera side, as a phone on the same LAN would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_secret
from tests.support.agent import NamespacedAgent
from tests.support.avahi import Avahi, missing_programs
from tests.support.camera import RtspCamera, gst_rtsp_server_missing
from tests.support.netns import NetnsPair, netns_pair, wait_for_output
from tests.support.onvif_site import PASSWORD, CameraSite

__all__ = ["netns_pair"]

NEW_IP = "10.204.7.2"  # the camera's address after the "DHCP renewal"
ATTACKER_IN = "10.205.9.66"  # an attacker inside the networks cameras may move to
ATTACKER_OUT = "10.206.1.66"  # an attacker outside them
#: Where adopted cameras may follow announcements in these tests (discovery.follow_networks):
#: the namespaces' own range, the renewed camera's network and the inside attacker's.
FOLLOW = ["10.203.0.0/16", "10.204.7.0/24", "10.205.9.0/24"]

pytestmark = pytest.mark.skipif(gst_rtsp_server_missing() is not None,
                                reason=str(gst_rtsp_server_missing()))


@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[NamespacedAgent]:
    process = NamespacedAgent(
        netns_pair, tmp_path, [{"id": "demo", "source": "testsrc://"}],
        env={"THERELAY_DISCOVERY_ENABLED": "true", "THERELAY_DISCOVERY_ADVERTISE": "true"},
        discovery={"probe_timeout": 2, "interval": 0, "follow_networks": FOLLOW},
    )
    yield process
    process.stop()


def agent_cli(agent: NamespacedAgent, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI inside the agent's namespace (discovery needs the camera network)."""
    done = agent.pair.run(agent.pair.agent_ns, [sys.executable, "-m", "agent", *args],
                          env=agent.env, capture_output=True, text=True, timeout=90)
    assert PASSWORD not in done.stdout + done.stderr
    return done


def watch(agent: NamespacedAgent, camera: str, token: str, until: int = 201) -> dict[str, Any]:
    """A WHEP viewer on the camera network; its status and the size of its first frame.
    Tries again (the daemon applies an adoption or a removal within a second or two) until
    the status is ``until``."""
    pair = agent.pair
    for _ in range(20):
        done = pair.run(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.ns_viewer", agent.base, camera, pair.viewer_ip,
        ], env={**agent.env, "VIEWER_TOKEN": token}, capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        if result["status"] == until:
            return result
        time.sleep(0.25)
    return result


def admin_cameras(agent: NamespacedAgent, admin_token: str) -> dict[str, dict[str, Any]]:
    """GET /api/v1/admin/cameras from the camera network, by camera id."""
    script = ("import json, os, sys, urllib.request\n"
              "req = urllib.request.Request(sys.argv[1] + '/api/v1/admin/cameras', headers={\n"
              "    'Authorization': 'Bearer ' + os.environ['ADMIN_TOKEN']})\n"
              "print(urllib.request.urlopen(req, timeout=10).read().decode())\n")
    pair = agent.pair
    done = pair.run(pair.viewer_ns, [sys.executable, "-c", script, agent.base],
                    env={**agent.env, "ADMIN_TOKEN": admin_token}, capture_output=True,
                    text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    return {c["id"]: c for c in json.loads(done.stdout)["cameras"]}


def log_event(agent: NamespacedAgent, event: str, timeout: float = 30,
              **fields: Any) -> dict[str, Any]:
    """The first ``event`` in the agent's log whose fields have these values."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent.log.flush()
        for line in agent.log_path.read_text().splitlines():
            if f'"{event}"' in line:
                entry: dict[str, Any] = json.loads(line)
                if all(entry.get(k) == v for k, v in fields.items()):
                    return entry
        time.sleep(0.2)
    raise AssertionError(f"no {event} {fields} in the agent's log: "
                         f"{agent.log_path.read_text()[-3000:]}")


def test_discover_adopt_watch_and_follow_a_moved_camera(
    agent: NamespacedAgent, netns_pair: NetnsPair, tmp_path: Path
) -> None:
    pair = netns_pair
    site = CameraSite(pair, tmp_path, pair.viewer_ip)
    try:
        # 1. discover: found over ONVIF, profiles asked with the credentials
        done = agent_cli(agent, "discover", "--json", "--timeout", "2", "--user", "admin",
                         "--password-file", str(site.password_file))
        assert done.returncode == 0, done.stderr
        cameras = json.loads(done.stdout)["cameras"]
        (found,) = [c for c in cameras if c["identity"] == site.uuid]
        assert found["methods"] == ["onvif"]
        assert found["name"] == "Front door"
        assert found["adopted_as"] is None
        assert found["onvif_error"] is None
        uris = {p["token"]: p["stream_uri"] for p in found["profiles"]}
        assert uris["Profile_1"].startswith(
            f"rtsp://admin@{pair.viewer_ip}:8554/Streaming/Channels/101")

        # the table for people names it too, without the password
        table = agent_cli(agent, "discover", "--timeout", "2")
        assert found["id"] in table.stdout and "Front door" in table.stdout

        # 2. adopt it: no YAML edit, no restart
        done = agent_cli(agent, "cameras", "adopt", found["id"], "--user", "admin",
                         "--password-file", str(site.password_file), "--id", "door")
        assert done.returncode == 0, done.stderr
        listed = json.loads(agent_cli(agent, "cameras", "list", "--json").stdout)["cameras"]
        door = next(c for c in listed if c["id"] == "door")
        assert door["from"] == "adopted (onvif)" and door["identity"] == site.uuid
        assert pair.viewer_ip in door["source"]
        credential = Path(agent.env["THERELAY_STATE_DIR"]) / "camera-credentials" / "door"
        assert credential.read_text() == PASSWORD
        assert credential.stat().st_mode & 0o777 == 0o600

        # 3. a viewer plays it
        token = json.loads(agent.cli("token", "create", "--camera", "door", "--json").stdout)
        seen = watch(agent, "door", token["token"])
        assert seen == {"status": 201, "width": 320, "height": 240}, seen
        assert site.rtsp.total_connections >= 1

        # doctor checks adopted cameras too, with their stored credentials
        report = json.loads(agent_cli(agent, "doctor", "--json").stdout)
        door_checks = {c["check"]: c["status"] for c in report["checks"]
                       if c["group"] == "camera door"}
        assert door_checks["rtsp"] == "ok" and door_checks["codec"] == "ok", report
    finally:
        site.close()

    # 4. the camera comes back at another address (same ONVIF endpoint): the agent follows
    for ns, ifname, address in ((pair.viewer_ns, pair.viewer_if, f"{NEW_IP}/24"),
                                (pair.agent_ns, pair.agent_if, "10.204.7.1/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", ifname], check=True)
    moved = CameraSite(pair, tmp_path, NEW_IP, endpoint=site.uuid)
    try:
        entry = log_event(agent, "camera_moved")
        assert entry["camera"] == "door" and entry["new"] == NEW_IP
        listed = json.loads(agent_cli(agent, "cameras", "list", "--json").stdout)["cameras"]
        door = next(c for c in listed if c["id"] == "door")
        assert door["source"].startswith(f"rtsp://{NEW_IP}:8554/Streaming/Channels/101")
        assert door["identity"] == site.uuid  # same camera, same id
        seen = watch(agent, "door", token["token"])
        assert seen == {"status": 201, "width": 320, "height": 240}, seen
        assert moved.rtsp.total_connections >= 1
        audit = json.loads(agent.cli("audit", "--camera", "door", "--json").stdout)
        events = [e["event"] for e in audit]
        assert "camera.adopted" in events and "camera.moved" in events
    finally:
        moved.close()

    # 5. removal: gone from the list and from the daemon
    done = agent_cli(agent, "cameras", "remove", "door")
    assert done.returncode == 0, done.stderr
    assert not credential.exists()
    assert watch(agent, "door", token["token"], until=404)["status"] == 404


class Attacker:
    """Someone else on the camera LAN at ``ip``: an RTSP listener answering ``401 Basic``
    (tests/support/rtsp_trap.py), the project's ONVIF device replaying the same camera model
    (so the same serial number) without knowing its password, and the `WSDiscovery`
    publisher forging the adopted camera's endpoint UUID with the attacker's XAddrs."""

    def __init__(self, pair: NetnsPair, tmp: Path, ip: str, uuid: str) -> None:
        self.pair = pair
        subprocess.run(["ip", "-n", pair.viewer_ns, "addr", "add", f"{ip}/24", "dev",
                        pair.viewer_if], check=True)
        guess = tmp / f"guess-{ip}"
        guess.write_text("not-the-password")
        self.trap = pair.popen(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.rtsp_trap", "basic", ip, "8554",
        ], stdout=subprocess.PIPE, text=True)
        wait_for_output(self.trap, "listening", timeout=20)
        self.onvif = pair.popen(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.onvif_device", "--model", "hikvision",
            "--host", ip, "--port", "8080", "--user", "admin", "--password-file", str(guess),
            "--stream-host", f"{ip}:8554",
        ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        xaddr = wait_for_output(self.onvif, "READY", timeout=30).split("READY ")[-1].strip()
        self.hello = pair.popen(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.wsd_peer", "publish", "Front door",
            "DS-2CD2043G2-I", xaddr, uuid,
        ], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        wait_for_output(self.hello, "published", timeout=20)

    def close(self) -> list[dict[str, Any]]:
        """Stop; what the RTSP listener received (connections, requests, Authorization)."""
        assert self.hello.stdin is not None
        self.hello.stdin.write("stop\n")
        self.hello.stdin.flush()
        for proc in (self.hello, self.onvif, self.trap):
            proc.terminate()
        out, _ = self.trap.communicate(timeout=10)
        for proc in (self.hello, self.onvif):
            proc.wait(timeout=10)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_forged_hello_moves_nothing_and_gets_no_password(
    agent: NamespacedAgent, netns_pair: NetnsPair, tmp_path: Path
) -> None:
    """The red-team finding: one Hello with the adopted camera's UUID and an attacker's
    XAddrs. Outside the allowed networks nothing is even asked there; inside them the
    device fails to prove itself over ONVIF. Either way the camera stays, its viewer keeps
    watching, and the attacker's RTSP listener never sees a password (nor a connection)."""
    pair = netns_pair
    site = CameraSite(pair, tmp_path, pair.viewer_ip)
    attackers: list[Attacker] = []
    try:
        found = next(c for c in json.loads(agent_cli(
            agent, "discover", "--json", "--timeout", "2").stdout)["cameras"]
            if c["identity"] == site.uuid)
        done = agent_cli(agent, "cameras", "adopt", found["id"], "--user", "admin",
                         "--password-file", str(site.password_file), "--id", "door")
        assert done.returncode == 0, done.stderr
        token = json.loads(agent.cli("token", "create", "--camera", "door", "--json").stdout)
        assert watch(agent, "door", token["token"])["status"] == 201

        for ip, why in ((ATTACKER_OUT, "outside the networks"),
                        (ATTACKER_IN, "did not prove it is this camera")):
            attackers.append(Attacker(pair, tmp_path, ip, site.uuid))
            entry = log_event(agent, "camera_move_held", new=ip)
            assert entry["camera"] == "door" and why in entry["reason"], entry

        listed = json.loads(agent_cli(agent, "cameras", "list", "--json").stdout)["cameras"]
        door = next(c for c in listed if c["id"] == "door")
        assert door["source"].startswith(f"rtsp://{pair.viewer_ip}:8554/"), door
        assert door["move_held"]["to"] == ATTACKER_IN and door["serial"], door
        table = agent_cli(agent, "cameras", "list").stdout
        assert f"cameras move door {ATTACKER_IN}" in table

        seen = watch(agent, "door", token["token"])  # the viewer keeps watching the camera
        assert seen == {"status": 201, "width": 320, "height": 240}, seen

        admin = json.loads(agent.cli("token", "create", "--admin", "--json").stdout)["token"]
        shown = admin_cameras(agent, admin)  # what Token Studio's Cameras view shows
        assert f"cameras move door {ATTACKER_IN}" in shown["door"]["held_move"], shown

        report = json.loads(agent_cli(agent, "doctor", "--json").stdout)
        held = [c for c in report["checks"] if c["group"] == "camera door"
                and c["check"] == "move"]
        assert held and held[0]["status"] == "warn", report
        audit = json.loads(agent.cli("audit", "--camera", "door", "--json").stdout)
        assert [e["event"] for e in audit].count("camera.move_held") == 2
        assert "camera.moved" not in [e["event"] for e in audit]
    finally:
        received = [a.close() for a in attackers]
        site.close()
    for lines in received:
        assert not [line for line in lines if "connection" in line], lines
    assert PASSWORD not in agent.log_path.read_text()


def test_agent_announces_itself_over_mdns(agent: NamespacedAgent, netns_pair: NetnsPair) -> None:
    """Another machine on the LAN browsing _therelay._tcp finds the agent at its address."""
    script = (
        "import asyncio, json\n"
        "from agent.discovery import mdns\n"
        "found = asyncio.run(mdns.browse(['_therelay._tcp.local.'], 4))\n"
        "print(json.dumps([{'port': s.port, 'addresses': s.addresses, 'txt': dict(s.txt)}"
        " for s in found]))\n"
    )
    done = netns_pair.run(netns_pair.viewer_ns, [sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    (service,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert service["port"] == agent.port
    assert service["addresses"] == [netns_pair.agent_ip]
    assert service["txt"]["id"] == "site1"


def test_an_mdns_camera_announced_by_avahi_is_found_adopted_and_watched(
    agent: NamespacedAgent, netns_pair: NetnsPair, tmp_path: Path
) -> None:
    """avahi-daemon + avahi-publish-service announce an _rtsp._tcp camera (no ONVIF); the
    agent finds it, adopts its announced URL with credentials, and avahi sees the agent."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"avahi test peer unavailable: {', '.join(missing)} not installed")
    pair = netns_pair
    creds = tmp_path / "creds"
    creds.mkdir()
    password_file = creds / "garage.password"
    write_secret(password_file, PASSWORD)
    camera = RtspCamera.start(8555, netns=pair.viewer_ns, address=pair.viewer_ip,
                              path="/garage", user="viewer", password=PASSWORD,
                              width=320, height=240, fps=15)
    try:
        with Avahi(pair, "viewer", tmp_path / "avahi") as avahi:
            avahi.publish("Garage camera", "_rtsp._tcp", 8555, {"path": "/garage"})
            done = agent_cli(agent, "discover", "--json", "--timeout", "3")
            assert done.returncode == 0, done.stderr
            cameras = json.loads(done.stdout)["cameras"]
            (found,) = [c for c in cameras if c["name"] == "Garage camera"]
            assert found["methods"] == ["mdns"]
            assert found["identity"] == "Garage camera._rtsp._tcp.local."
            assert found["rtsp_urls"] == [f"rtsp://{pair.viewer_ip}:8555/garage"]

            done = agent_cli(agent, "cameras", "adopt", found["id"], "--user", "viewer",
                             "--password-file", str(password_file))
            assert done.returncode == 0, done.stderr
            assert "as camera 'garage-camera'" in done.stdout
            token = json.loads(agent.cli("token", "create", "--camera", "garage-camera",
                                         "--json").stdout)
            seen = watch(agent, "garage-camera", token["token"])
            assert seen == {"status": 201, "width": 320, "height": 240}, seen

            # the running daemon's own announcement, as avahi-browse reports it
            (entry,) = [e for e in avahi.browse("_therelay._tcp") if e.address]
            assert entry.address == pair.agent_ip and entry.port == agent.port
            assert entry.txt["id"] == "site1"

            # SIGTERM withdraws it (goodbye packets): avahi forgets it one second later
            # (RFC 6762 §10.1), not after the records' time to live (75 minutes for SRV)
            agent.stop()
            for _ in range(20):
                if not [e for e in avahi.browse("_therelay._tcp") if e.address]:
                    break
                time.sleep(0.25)
            assert [e for e in avahi.browse("_therelay._tcp") if e.address] == []
    finally:
        camera.close()
