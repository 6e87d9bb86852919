"""mDNS against real peers inside network namespaces the test creates.

avahi-daemon (tests/support/avahi.py) runs in the "viewer" namespace as the camera side and
as a third-party browser; the agent's mDNS code runs in the "agent" namespace as a process
of its own (tests/support/mdns_agent.py). Multicast crosses only the veth pair between them.
Needs root and avahi (the fixtures skip otherwise).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.discovery.interfaces import DiscoveryError
from agent.discovery.mdns import (
    AgentAdvertiser,
    MdnsBrowser,
    MdnsService,
    agent_txt,
    open_zeroconf,
)
from tests.support.avahi import Avahi, missing_programs, wait_until
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]  # the fixture, used by name below

ROOT = Path(__file__).resolve().parents[2]


class MdnsAgent:
    """tests/support/mdns_agent.py in the agent namespace; its JSON events, as they come."""

    def __init__(self, pair: NetnsPair, tmp: Path, *args: str) -> None:
        self.log_path = tmp / "mdns-agent.log"
        self._log = self.log_path.open("w")
        self.proc: subprocess.Popen[str] = pair.popen(
            "agent",
            [sys.executable, "-m", "tests.support.mdns_agent", "--interface", pair.agent_ip,
             *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10,
                 after: int = 0) -> dict[str, Any]:
        """The first event from index ``after`` on that ``match``es, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if match(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no matching event within {timeout} s; exit {self.proc.poll()}; "
                        f"events {self.events[-10:]}; log {self.log_path.read_text()[-2000:]}")
                self._cond.wait(remaining)

    def change(self, kind: str, instance: str, after: int = 0,
               timeout: float = 10) -> dict[str, Any]:
        event = self.wait_for(lambda e: e["event"] == "change" and e["kind"] == kind
                              and e["service"]["instance"] == instance, timeout, after)
        service: dict[str, Any] = event["service"]
        return service

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str, reply: str, timeout: float = 10) -> dict[str, Any]:
        mark = len(self.events)
        self.send(command)
        return self.wait_for(lambda e: e["event"] == reply, timeout, after=mark)

    def quit(self) -> None:
        """End it cleanly; fail if its event loop was ever blocked."""
        self.ask("quit", "bye")
        self.proc.wait(timeout=10)
        self._log.close()
        slow = [e for e in self.events if e["event"] == "slow"]
        assert not slow, f"the agent's event loop was blocked: {slow}"

    def log_lines(self, event: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event:
                    lines.append(record)
        return lines


@pytest.fixture
def avahi(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[Avahi]:
    missing = missing_programs()
    if missing:
        pytest.skip(f"avahi test peer unavailable: {', '.join(missing)} not installed")
    with Avahi(netns_pair, "viewer", tmp_path) as peer:
        yield peer


def test_browse_finds_avahi_cameras_follows_updates_and_removals(
    netns_pair: NetnsPair, avahi: Avahi, tmp_path: Path
) -> None:
    cam = "Cam 1._rtsp._tcp.local."
    camera_ip = netns_pair.viewer_ip
    publisher = avahi.publish("Cam 1", "_rtsp._tcp", 8554, {"path": "/stream1", "Model": "T1"})
    agent = MdnsAgent(netns_pair, tmp_path, "--types", "_rtsp._tcp", "_rtsps._tcp.local.",
                      "_axis-video._tcp.local.")

    found = agent.change("added", cam)
    assert found == {
        "instance": cam, "service_type": "_rtsp._tcp.local.", "name": "Cam 1",
        "host": f"{avahi.host}.local.", "addresses": [camera_ip], "port": 8554,
        "txt": {"path": "/stream1", "model": "T1"},
        "rtsp_url": f"rtsp://{camera_ip}:8554/stream1",
    }

    # A camera that appears while the agent browses; Axis serves RTSP on 554 (assumed).
    axis = avahi.publish("AXIS M1065-L", "_axis-video._tcp", 80)
    axis_service = agent.change("added", "AXIS M1065-L._axis-video._tcp.local.")
    assert axis_service["rtsp_url"] == f"rtsp://{camera_ip}:554/axis-media/media.amp"
    assert axis_service["port"] == 80

    # The camera restarts with another port and path, sending no goodbye (power cut): the
    # new announcement replaces the cached one under the same identity.
    mark = len(agent.events)
    avahi.crash([publisher, axis])
    avahi.start_daemon()
    publisher = avahi.publish("Cam 1", "_rtsp._tcp", 9554, {"path": "/stream2"})
    moved = agent.change("updated", cam, after=mark, timeout=15)
    assert moved["port"] == 9554
    assert moved["txt"] == {"path": "/stream2"}
    assert moved["rtsp_url"] == f"rtsp://{camera_ip}:9554/stream2"
    assert not [e for e in agent.events[mark:]
                if e["event"] == "change" and e["service"]["instance"] == cam
                and e["kind"] != "updated"]

    # Withdrawn politely: avahi sends goodbyes and the agent reports the removal.
    mark = len(agent.events)
    avahi.unpublish(publisher)
    gone = agent.change("removed", cam, after=mark)
    assert gone["port"] == 9554
    listed = agent.ask("services", "services")
    assert cam not in listed["names"]
    agent.quit()


def test_address_change_is_an_update_without_the_stale_address(
    netns_pair: NetnsPair, avahi: Avahi, tmp_path: Path
) -> None:
    # TEST-NET-1 addresses: only announced, never contacted.
    cam, host = "Cam 3._rtsp._tcp.local.", f"{avahi.host}-cam3.local"
    published = [avahi.publish_address(host, "192.0.2.10"),
                 avahi.publish("Cam 3", "_rtsp._tcp", 554, {"path": "/h264"}, host=host)]
    agent = MdnsAgent(netns_pair, tmp_path)
    first = agent.change("added", cam)
    assert first["addresses"] == ["192.0.2.10"]
    assert first["rtsp_url"] == "rtsp://192.0.2.10:554/h264"

    # Renumbered (DHCP) after a restart: the new A record flushes the cached one, which
    # lingers for a second (RFC 6762 §10.2); the update must not carry both.
    mark = len(agent.events)
    avahi.crash(published)
    avahi.start_daemon()
    avahi.publish_address(host, "192.0.2.11")
    avahi.publish("Cam 3", "_rtsp._tcp", 554, {"path": "/h264"}, host=host)
    moved = agent.change("updated", cam, after=mark, timeout=15)
    assert moved["addresses"] == ["192.0.2.11"]
    assert moved["rtsp_url"] == "rtsp://192.0.2.11:554/h264"
    time.sleep(2)  # nothing else follows: no flapping back to the old address
    later = [e for e in agent.events[mark:] if e["event"] == "change"]
    assert [e["kind"] for e in later] == ["updated"]
    agent.quit()


def test_one_shot_browse_lists_what_answered(
    netns_pair: NetnsPair, avahi: Avahi, tmp_path: Path
) -> None:
    avahi.publish("Cam 2", "_rtsps._tcp", 322, {"path": "/secure"})
    avahi.publish("Printer", "_ipp._tcp", 631)  # not a camera type: not listed
    agent = MdnsAgent(netns_pair, tmp_path, "--browse-once", "2", "--types",
                      *("_rtsp._tcp", "_rtsps._tcp", "_axis-video._tcp"))
    browsed = agent.wait_for(lambda e: e["event"] == "browsed")
    assert [s["instance"] for s in browsed["services"]] == ["Cam 2._rtsps._tcp.local."]
    assert browsed["services"][0]["rtsp_url"] == f"rtsps://{netns_pair.viewer_ip}:322/secure"
    agent.proc.wait(timeout=10)
    assert agent.proc.returncode == 0
    assert not [e for e in agent.events if e["event"] == "slow"]


class LiveLines:
    """Every line a process prints, collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))


def test_agent_announcement_is_seen_by_avahi_and_withdrawn_with_goodbyes(
    netns_pair: NetnsPair, avahi: Avahi, tmp_path: Path
) -> None:
    live = LiveLines(avahi.browse_live("_therelay._tcp"))
    agent = MdnsAgent(netns_pair, tmp_path, "--advertise-port", "8800",
                      "--advertise-address", netns_pair.agent_ip,
                      "--advertise-address", "127.0.0.1", "--agent-id", "site1")
    advertised = agent.wait_for(lambda e: e["event"] == "advertised")
    assert advertised["instance"] == "TheRelay Agent site1._therelay._tcp.local."

    entries = wait_until(lambda: avahi.browse("_therelay._tcp"), timeout=10)
    assert entries, "avahi never saw the agent's announcement"
    assert len(entries) == 1  # one address: the veth's, never 127.x
    entry = entries[0]
    assert entry.name == "TheRelay Agent site1"
    assert entry.service_type == "_therelay._tcp"
    assert entry.host == "therelay-site1.local"
    assert entry.address == netns_pair.agent_ip
    assert entry.port == 8800
    assert entry.txt == agent_txt("site1", "0.1.0-test")
    assert entry.txt["whep"] == "/whep/{camera}"

    # Stopping sends goodbyes: avahi drops the service at once, not after its TTL (75 min
    # for the PTR record, RFC 6762 §10).
    removed_line = "-;" + avahi.interface + ";IPv4;TheRelay\\032Agent\\032site1;_therelay._tcp"
    agent.ask("unadvertise", "unadvertised")
    assert wait_until(lambda: any(line.startswith(removed_line) for line in live.lines),
                      timeout=5), live.lines
    assert avahi.browse("_therelay._tcp") == []
    agent.quit()


# Runs in the viewer namespace: announce COUNT distinct fake cameras (PTR + SRV + TXT + A
# each, 8 to a packet) to 224.0.0.251:5353 from port 5353, as fast as the socket takes them.
FLOOD = r"""
import socket, sys
from zeroconf import const, DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText
source, count = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", 5353))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
unique = const._CLASS_IN | const._CLASS_UNIQUE
sent = 0
for start in range(0, count, 8):
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for i in range(start, min(start + 8, count)):
        name = f"Fake {i}._rtsp._tcp.local."
        host = f"fake{i}.local."
        out.add_answer_at_time(DNSPointer("_rtsp._tcp.local.", const._TYPE_PTR, const._CLASS_IN,
                                          4500, name), 0)
        out.add_answer_at_time(DNSService(name, const._TYPE_SRV, unique, 120, 0, 0, 554, host), 0)
        out.add_answer_at_time(DNSText(name, const._TYPE_TXT, unique, 4500, b"\x0apath=/fake"), 0)
        address = socket.inet_aton(f"10.99.{i // 256 % 256}.{i % 256}")
        out.add_answer_at_time(DNSAddress(host, const._TYPE_A, unique, 120, address), 0)
    for packet in out.packets():
        sock.sendto(packet, ("224.0.0.251", 5353))
        sent += 1
print(sent)
"""


def test_a_flood_of_announcements_is_capped(netns_pair: NetnsPair, tmp_path: Path) -> None:
    cap, count = 100, 3000
    agent = MdnsAgent(netns_pair, tmp_path, "--max-services", str(cap))
    agent.wait_for(lambda e: e["event"] == "ready")
    before = agent.ask("services", "services")
    assert before["count"] == 0

    done = netns_pair.run("viewer", [sys.executable, "-c", FLOOD, netns_pair.viewer_ip,
                                     str(count)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= count // 8

    def settled() -> dict[str, Any] | None:
        reply = agent.ask("services", "services")
        return reply if reply["count"] == cap and reply["dropped"] > 0 else None

    after = wait_until(settled, timeout=20, interval=0.5)
    assert after, agent.events[-3:]
    # The process survived, the table is exactly at the cap, the rest was dropped quietly.
    assert agent.proc.poll() is None
    added = [e for e in agent.events if e["event"] == "change" and e["kind"] == "added"]
    assert len(added) == cap
    assert len(agent.log_lines("mdns_table_full")) == 1
    print(f"\nflood: {count} services announced in {done.stdout.strip()} packets; "
          f"table {after['count']}, dropped {after['dropped']}, "
          f"max RSS {before['max_rss_kib']} → {after['max_rss_kib']} KiB")
    agent.quit()


# -- in-process, on loopback only (multicast on lo stays on this machine) ----------------------


async def test_name_conflicts_are_renamed_and_loopback_is_never_announced() -> None:
    agent_id = f"lo-{secrets.token_hex(3)}"
    seen: list[tuple[str, MdnsService]] = []

    def on_change(kind: str, service: MdnsService) -> None:
        if agent_id in service.instance:
            seen.append((kind, service))
        raise RuntimeError("a consumer bug")  # must not stop discovery

    first, second, watcher = (open_zeroconf(["127.0.0.1"]) for _ in range(3))
    browser = MdnsBrowser(watcher, ["_therelay._tcp"], on_change)
    await browser.start()
    one = AgentAdvertiser(first, agent_id, "1", 8800, ["10.9.9.1", "127.0.0.1"])
    two = AgentAdvertiser(second, agent_id, "1", 8801, ["10.9.9.2"])
    only_loopback = AgentAdvertiser(second, f"{agent_id}-lo", "1", 8802, ["127.0.0.1"])
    try:
        await one.start()
        await two.start()  # same agent id on another machine: probing finds the name taken
        await only_loopback.start()
        assert one.instance == f"TheRelay Agent {agent_id}._therelay._tcp.local."
        assert two.instance == f"TheRelay Agent {agent_id}-2._therelay._tcp.local."
        assert only_loopback.instance is None

        def both() -> bool:
            names = {s.instance for s in browser.services.values()}
            return {one.instance, two.instance} <= names

        for _ in range(50):
            if both():
                break
            await asyncio.sleep(0.1)
        services = browser.services
        assert services[str(one.instance)].addresses == ("10.9.9.1",)
        assert services[str(two.instance)].port == 8801
        assert not [s for s in services.values() if f"{agent_id}-lo" in s.instance]

        first_name = str(one.instance)
        await one.stop()
        assert one.instance is None
        for _ in range(30):
            if first_name not in browser.services:
                break
            await asyncio.sleep(0.1)
        assert first_name not in browser.services  # the goodbye, not a TTL expiry
        assert two.instance in browser.services
        assert ("removed", services[first_name]) in seen
    finally:
        await browser.stop()
        await first.async_close()
        await second.async_close()
        # Stopping after zeroconf closed (it sent the goodbyes then) neither hangs nor raises.
        await two.stop()
        await watcher.async_close()


async def test_open_zeroconf_refuses_unknown_interfaces() -> None:
    """The same rule as WS-Discovery (agent/discovery/interfaces.py): checked before any
    socket is opened, so nothing is sent."""
    with pytest.raises(DiscoveryError, match="no interface named 'no-such-if0'"):
        open_zeroconf(["no-such-if0"])
    with pytest.raises(DiscoveryError, match=r"192\.0\.2\.77 is not an IPv4 address of this"):
        open_zeroconf(["192.0.2.77"])
    with pytest.raises(DiscoveryError, match="IPv6"):
        open_zeroconf(["2001:db8::1"])
