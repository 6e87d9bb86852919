"""WS-Discovery against a real third-party responder, across two network namespaces.

The camera side is the ``WSDiscovery`` package's ThreadedWSPublishing in the viewer namespace;
the agent side (probe, listener) runs in the agent namespace. Multicast crosses the veth pair
(both namespaces route 224.0.0.0/4 to it); nothing leaves the two namespaces.
Needs root for the namespaces (the ``netns_pair`` fixture skips otherwise).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.discovery.wsd import MAX_SEEN_IDS, WSD_GROUP
from tests.conftest import SLOW_CALLBACK_SECONDS
from tests.support.agent import blocked_for
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]  # the fixture, used by name below

ROOT = Path(__file__).resolve().parents[2]
NVT = "dn:NetworkVideoTransmitter"


class Peer:
    """A ``tests.support.wsd_peer`` process in one namespace, its JSON lines in a queue."""

    def __init__(self, pair: NetnsPair, ns: str, *args: str) -> None:
        self.proc = pair.popen(
            ns, [sys.executable, "-u", "-m", "tests.support.wsd_peer", *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.logs: list[str] = []  # structlog lines, not JSON
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
            else:
                self.logs.append(line)

    def expect(self, key: str, timeout: float = 15.0, match: Any = None) -> Any:
        """The value of the next line with ``key`` (and value ``match``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(self._why(key)) from None
            if "error" in line:
                raise AssertionError(line["error"])
            if key in line and (match is None or match(line[key])):
                return line[key]

    def _why(self, key: str) -> str:
        status = self.proc.poll()
        err = str(self.proc.stderr.read()) if status is not None and self.proc.stderr else ""
        logs = "".join(self.logs)[-2000:]
        return f"no {key!r} from {self.proc.args!r} (exit status {status}) {logs} {err[-2000:]}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def publisher(pair: NetnsPair, name: str = "Front%20Door", hardware: str = "DS-2CD2143G2-I"
              ) -> tuple[Peer, str, str]:
    xaddr = f"http://{pair.viewer_ip}/onvif/device_service"
    peer = Peer(pair, "viewer", "publish", name, hardware, xaddr)
    return peer, peer.expect("published"), xaddr


def test_probe_finds_the_third_party_publisher(netns_pair: NetnsPair) -> None:
    camera, uuid, xaddr = publisher(netns_pair)
    started = time.monotonic()
    prober = Peer(netns_pair, "agent", "probe", "2.5")
    endpoints = prober.expect("endpoints")
    print(f"probe process (start, import, 2.5 s probe) took {time.monotonic() - started:.2f} s")
    assert len(endpoints) == 1
    found = endpoints[0]
    assert found["uuid"] == uuid and uuid.startswith("urn:uuid:")
    assert found["xaddrs"] == [xaddr]
    assert NVT in found["types"]
    assert (found["name"], found["hardware"], found["location"]) == (
        "Front Door", "DS-2CD2143G2-I", None)
    assert found["source"] == netns_pair.viewer_ip
    camera.send("stop")
    camera.expect("stopped")


def test_probe_on_a_named_interface_and_nothing_when_nobody_answers(
        netns_pair: NetnsPair) -> None:
    prober = Peer(netns_pair, "agent", "probe", "1.0", netns_pair.agent_if)
    assert prober.expect("endpoints") == []
    _camera, uuid, _ = publisher(netns_pair, "Gate", "M2036-LE")
    prober = Peer(netns_pair, "agent", "probe", "2.0", netns_pair.agent_ip)
    assert [e["uuid"] for e in prober.expect("endpoints")] == [uuid]


def test_listener_hears_hello_on_publish_and_bye_on_stop(netns_pair: NetnsPair) -> None:
    listener = Peer(netns_pair, "agent", "listen")
    assert listener.expect("listening") == [netns_pair.agent_ip]
    camera, uuid, xaddr = publisher(netns_pair, "Back%20Yard", "HD_PREDATOR")
    hello = listener.expect("hello", match=lambda e: e["uuid"] == uuid)
    assert (hello["name"], hello["hardware"], hello["xaddrs"]) == (
        "Back Yard", "HD_PREDATOR", [xaddr])
    assert hello["source"] == netns_pair.viewer_ip
    camera.send("stop")
    assert listener.expect("bye", match=lambda u: u == uuid) == uuid
    listener.send("stats")
    stats = listener.expect("stats")
    assert (stats["hellos"], stats["byes"]) == (1, 1)  # each delivered once


def test_a_flood_leaves_the_listener_bounded_and_working(netns_pair: NetnsPair) -> None:
    listener = Peer(netns_pair, "agent", "listen")
    listener.expect("listening")
    good = "urn:uuid:00000000-0000-4000-8000-00000000600d"
    flooder = Peer(netns_pair, "viewer", "flood", WSD_GROUP, "20000", good)
    flooded = flooder.expect("flooded", timeout=60)
    listener.expect("hello", timeout=30, match=lambda e: e["uuid"] == good)
    listener.send("stats")
    stats = listener.expect("stats")
    peak = stats["peak_kib"]
    print(f"flood: {flooded} datagrams sent, listener stats {stats}, "
          f"tracemalloc peak {peak} KiB")
    assert stats["received"] > 2000  # the flood did reach the listener
    assert stats["rate_limited"] > 0 and stats["garbage"] > 0
    assert stats["tracked_ids"] <= MAX_SEEN_IDS
    assert peak < 8 * 1024  # a few MiB at most, whatever the flood size
    assert listener.proc.poll() is None
    listener.send("stop")
    assert listener.proc.wait(timeout=10) == 0
    assert listener.proc.stderr is not None
    # The peer inherits PYTHONASYNCIODEBUG=1: asyncio logs any step over 100 ms (wall clock,
    # so a loaded machine's scheduler shows up too); a step as long as the suite's threshold
    # fails the test, as it would in the test process.
    slow = [line for line in listener.proc.stderr.read().splitlines()
            if blocked_for(line) >= SLOW_CALLBACK_SECONDS]
    assert not slow, slow


def test_no_usable_interface_is_a_clear_error(netns_pair: NetnsPair) -> None:
    netns_pair.run("agent", ["ip", "link", "set", netns_pair.agent_if, "down"], check=True)
    prober = Peer(netns_pair, "agent", "probe", "0.5")
    with pytest.raises(AssertionError, match="no network interface with an IPv4 address is up"):
        prober.expect("endpoints")


def test_listener_port_taken_without_sharing_is_a_clear_error(netns_pair: NetnsPair) -> None:
    holder = netns_pair.popen("agent", [sys.executable, "-c", (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', 3702)); print('bound', flush=True); time.sleep(60)\n"
    )], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
    listener = Peer(netns_pair, "agent", "listen")
    with pytest.raises(AssertionError, match="cannot listen for camera announcements on UDP"):
        listener.expect("listening")
