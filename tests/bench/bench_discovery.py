"""Benchmark: discovery in two network namespaces — how long `discover` takes, how soon an
adopted camera is served, and how soon the daemon follows a camera to a new address.

The camera side is real peers (tests/support/onvif_site.py: GStreamer RTSP server, the test
ONVIF device with WS-Security, the WSDiscovery package's publisher). Times come from the
daemon's own log timestamps, so process start-up of the measuring tools does not count.
Run (as root, after ./test.sh installed the test packages):
``.venv/bin/python -m tests.bench.bench_discovery``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.support.agent import NamespacedAgent
from tests.support.netns import NetnsPair
from tests.support.onvif_site import CameraSite

MOVES = 4
DISCOVER_TIMEOUTS = (1.0, 2.0, 3.0)

os.environ.pop("PYTHONASYNCIODEBUG", None)  # measure the daemon as it runs in production


def cli(agent: NamespacedAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return agent.pair.run(agent.pair.agent_ns, [sys.executable, "-m", "agent", *args],
                          env=agent.env, capture_output=True, text=True, timeout=120)


def events(agent: NamespacedAgent, name: str) -> list[dict[str, Any]]:
    agent.log.flush()
    out = []
    for line in agent.log_path.read_text().splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def wait_event(agent: NamespacedAgent, name: str, count: int, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(agent, name)
        if len(found) >= count:
            return stamp(found[count - 1])
        time.sleep(0.05)
    raise RuntimeError(f"no {name} #{count} in the daemon's log")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, NetnsPair() as pair:
        base = Path(tmp)
        agent = NamespacedAgent(
            pair, base, [{"id": "demo", "source": "testsrc://"}],
            env={"THERELAY_DISCOVERY_ENABLED": "true", "THERELAY_DISCOVERY_ADVERTISE": "true"},
            # the moves below change networks: allowed here (discovery.follow_networks)
            discovery={"probe_timeout": 2, "interval": 0,
                       "follow_networks": ["10.203.0.0/16", "10.204.0.0/16"]})
        site = CameraSite(pair, base, pair.viewer_ip)
        try:
            print("discover (one ONVIF camera, credentials given; whole command incl. start-up)")
            for timeout in DISCOVER_TIMEOUTS:
                started = time.monotonic()
                done = cli(agent, "discover", "--json", "--timeout", str(timeout), "--user",
                           "admin", "--password-file", str(site.password_file))
                took = time.monotonic() - started
                found = [c for c in json.loads(done.stdout)["cameras"]
                         if c["identity"] == site.uuid]
                profiles = len(found[0]["profiles"]) if found else 0
                print(f"  --timeout {timeout:g}: {took:.2f} s, found {len(found)}, "
                      f"{profiles} profiles")
            short = found[0]["id"]

            done = cli(agent, "cameras", "adopt", short, "--user", "admin", "--password-file",
                       str(site.password_file), "--id", "door")
            adopted_at = time.time()
            applied = wait_event(agent, "adopted_cameras_applied", 1)
            print(f"adoption committed → camera served by the daemon: "
                  f"{(applied - adopted_at) * 1000:.0f} ms")
        finally:
            site.close()

        follow: list[float] = []
        current = site
        for n in range(1, MOVES + 1):
            address = f"10.204.{n}.2"
            for ns, ifname, cidr in ((pair.viewer_ns, pair.viewer_if, f"{address}/24"),
                                     (pair.agent_ns, pair.agent_if, f"10.204.{n}.1/24")):
                subprocess.run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname], check=True)
            current = CameraSite(pair, base, address, endpoint=site.uuid)
            try:
                moved = wait_event(agent, "camera_moved", n)
                follow.append(moved - current.announced_at)
            finally:
                current.close()
        print(f"Hello from a new address → stream URL moved (identity proved and URL asked "
              f"over ONVIF with the stored credentials), {MOVES} moves: median "
              f"{statistics.median(follow) * 1000:.0f} ms, max {max(follow) * 1000:.0f} ms")
        started = time.monotonic()
        agent.stop()
        print(f"SIGTERM → exit with discovery and the mDNS announcement on: "
              f"{time.monotonic() - started:.2f} s")


if __name__ == "__main__":
    main()
