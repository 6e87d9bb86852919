"""The network-namespace harness itself: Chromium in the viewer namespace gathers ICE host
candidates on its veth address, and the namespaces reach nothing but each other.

Needs root (the ``netns_pair`` fixture skips otherwise) and Debian's chromium
(``scripts/setup-system --test``). Screenshots go to ``test-artifacts/netns_harness/``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.support.browser import artifact_path, chromium_available, run_in_browser
from tests.support.netns import NetnsPair, netns_pair, wait_for_output

__all__ = ["netns_pair"]  # the fixture, used by name below

ICE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ICE gathering</title></head>
<body style="font: 14px sans-serif">
<h1>ICE gathering in the viewer namespace</h1>
<pre id="out">gathering…</pre>
<script>
(async () => {
  try {
    const pc = new RTCPeerConnection({iceServers: []});
    pc.createDataChannel("probe");
    const gathered = new Promise(resolve => {
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") resolve();
      });
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered;
    const candidates = pc.localDescription.sdp.split(/\\r?\\n/)
      .filter(line => line.startsWith("a=candidate:"))
      .map(line => line.slice(2));
    window.__result = {candidates};
    pc.close();
  } catch (e) {
    window.__result = {error: String(e)};
  }
  document.getElementById("out").textContent = JSON.stringify(window.__result, null, 2);
})();
</script>
</body></html>
"""

# Runs inside a namespace: accept TCP connections on ADDRESS:PORT until killed.
LISTENER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""

# Runs inside a namespace: try a TCP connection to each HOST:PORT given; print a JSON verdict.
PROBE = """
import json, socket, sys
verdict = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        verdict[target] = "connected"
    except OSError as exc:
        verdict[target] = type(exc).__name__
print(json.dumps(verdict))
"""


def _host_candidates(result: dict) -> list[list[str]]:
    """Fields of each ``candidate:... typ host ...`` line (field 4 is the address)."""
    assert "error" not in result, result
    return [line.split() for line in result["candidates"] if " typ host" in line]


def _serve_ice_page(pair: NetnsPair, tmp_path) -> str:
    site = tmp_path / "site"
    site.mkdir()
    (site / "ice.html").write_text(ICE_PAGE)
    return pair.serve_directory("agent", site) + "ice.html"


@pytest.fixture
def browser_pair(netns_pair: NetnsPair) -> NetnsPair:
    if not chromium_available():
        pytest.skip("/usr/bin/chromium is missing: run scripts/setup-system --test")
    return netns_pair


def test_chromium_in_the_viewer_namespace_gathers_a_host_candidate(
    browser_pair: NetnsPair, tmp_path
) -> None:
    pair = browser_pair
    url = _serve_ice_page(pair, tmp_path)
    shot = artifact_path("netns_harness", "ice_host_candidates.png")
    shot.unlink(missing_ok=True)
    report = run_in_browser(pair, url, "window.__result", shot, timeout=10,
                            expose_host_ips=True)
    hosts = _host_candidates(report.result)
    assert hosts, report.result
    assert pair.viewer_ip in {fields[4] for fields in hosts}, report.result
    # The viewer namespace has no other address, so nothing else can appear.
    assert {fields[4] for fields in hosts} == {pair.viewer_ip}, report.result
    assert shot.stat().st_size > 1000


def test_chromium_hides_host_addresses_behind_mdns_names_by_default(
    browser_pair: NetnsPair, tmp_path
) -> None:
    """What a real viewer sends: host candidates named ``<uuid>.local``, never the address."""
    pair = browser_pair
    url = _serve_ice_page(pair, tmp_path)
    shot = artifact_path("netns_harness", "ice_mdns_candidates.png")
    report = run_in_browser(pair, url, screenshot=shot, timeout=10)
    hosts = _host_candidates(report.result)
    assert hosts, report.result
    assert all(fields[4].endswith(".local") for fields in hosts), report.result
    assert pair.viewer_ip not in json.dumps(report.result)


def test_the_viewer_namespace_reaches_only_the_agent_namespace(netns_pair: NetnsPair) -> None:
    pair = netns_pair
    # Interfaces, addresses and routes are exactly the planned ones, and none in the root ns.
    for ns, own, peer in ((pair.agent_ns, pair.agent_ip, pair.viewer_ip),
                          (pair.viewer_ns, pair.viewer_ip, pair.agent_ip)):
        addrs = pair.run(ns, ["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert sorted(line.split()[3] for line in addrs.splitlines()) == sorted(
            ["127.0.0.1/8", f"{own}/30"]), addrs
        routes = pair.run(ns, ["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert sorted(line.split()[0] for line in routes.splitlines()) == sorted(
            ["default", str(pair.subnet), "224.0.0.0/4"]), routes
        assert f"default via {peer} " in routes
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    assert pair.agent_ip not in root.stdout and pair.viewer_ip not in root.stdout
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                check=True).stdout
    assert pair.agent_if not in root_links and pair.viewer_if not in root_links

    # A server on the root namespace's loopback, and one on the agent's veth address.
    with socket.create_server(("127.0.0.1", 0)) as root_server:
        root_server.setblocking(False)
        port = root_server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # reachable here
        root_server.accept()[0].close()
        agent_server = pair.popen(
            "agent", [sys.executable, "-c", LISTENER, pair.agent_ip, str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        wait_for_output(agent_server, "listening", timeout=10)
        started = time.monotonic()
        probe = pair.run(
            "viewer",
            [sys.executable, "-c", PROBE, f"127.0.0.1:{port}", f"{pair.agent_ip}:{port}"],
            capture_output=True, text=True, check=True,
        )
        verdict = json.loads(probe.stdout)
        assert verdict == {
            f"127.0.0.1:{port}": "ConnectionRefusedError",  # the viewer's own, empty loopback
            f"{pair.agent_ip}:{port}": "connected",
        }
        assert time.monotonic() - started < 5
        with pytest.raises(BlockingIOError):
            root_server.accept()  # nothing from the viewer namespace arrived here


def test_no_address_changes_once_the_pair_is_made(netns_pair: NetnsPair) -> None:
    """Chromium aborts a page load when an address of its namespace changes
    (net::ERR_NETWORK_CHANGED): an IPv6 link-local address becoming valid a second or two
    after the veth came up did it. The pair's addresses are final when it is returned."""
    pair = netns_pair
    monitors = [subprocess.Popen(["ip", "-n", ns, "-o", "monitor", "address", "link"],
                                 stdout=subprocess.PIPE, text=True)
                for ns in (pair.agent_ns, pair.viewer_ns)]
    time.sleep(3)  # duplicate address detection takes one second, after the carrier is up
    for monitor in monitors:
        monitor.terminate()
    changes = [monitor.communicate(timeout=5)[0] for monitor in monitors]
    assert changes == ["", ""], changes
