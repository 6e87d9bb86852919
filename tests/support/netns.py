"""Two Linux network namespaces joined by a veth pair, for tests that need a real network.

Headless Chromium gathers no ICE candidates without a non-loopback interface and a default
route, and tests may talk only to loopback or to addresses inside namespaces they created.
``NetnsPair`` therefore creates::

    tr-agent-<id>  lo up, veth 10.203.x.(n+1)/30, default via the viewer end, 224.0.0.0/4 on veth
    tr-viewer-<id> lo up, veth 10.203.x.(n+2)/30, default via the agent end,  224.0.0.0/4 on veth

with a random /30 in 10.203.0.0/16. The veth pair is created directly inside the two
namespaces: nothing in the root namespace gets an interface, an address or a route. Packets
from either namespace can reach only the other one (neither forwards), never the host or the
outside. Each namespace also gets ``/etc/netns/<ns>/resolv.conf`` (which ``ip netns exec``
mounts over ``/etc/resolv.conf``) naming only its own loopback, so a stray DNS lookup
(``socket.getfqdn`` in ``http.server``, say) fails at once instead of sending queries for the
host's resolver into the veth and waiting 10 s. Everything is removed on exit (processes
started through ``popen``/``run`` are ended first, then ``ip netns del``), also when the body
or the setup fails.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); the ``netns_pair`` fixture skips otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

TEST_RANGE = ipaddress.IPv4Network("10.203.0.0/16")
MULTICAST = "224.0.0.0/4"
IP = "ip"
NETNS_ETC = Path("/etc/netns")
RESOLV_CONF = "# written by tests/support/netns.py: no DNS inside test namespaces\n" \
    "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ``ip``, no CAP_SYS_ADMIN)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` in the calling process's namespace a moment ago.

    A namespace created by ``NetnsPair`` starts with no sockets at all, so any port is free
    there; this helper is for servers on the test process's own loopback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


#: Run inside a namespace (``sysctl`` is not on every machine; a kernel without IPv6 has no
#: such files).
_NO_IPV6 = ("d=/proc/sys/net/ipv6/conf; [ ! -d $d ] || "
            "{ echo 1 > $d/all/disable_ipv6 && echo 1 > $d/default/disable_ipv6; }")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=10, check=False)


def _ip_ok(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class NetnsPair:
    """``with NetnsPair() as pair:`` gives an agent and a viewer namespace joined by veth."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.agent_ns = f"tr-agent-{tag}"
        self.viewer_ns = f"tr-viewer-{tag}"
        # Interface names are at most 15 characters; both ends live in different namespaces.
        self.agent_if = f"tra-{tag}"
        self.viewer_if = f"trv-{tag}"
        subnets = TEST_RANGE.num_addresses // 4
        base = TEST_RANGE.network_address + 4 * secrets.randbelow(subnets)
        self.subnet = ipaddress.IPv4Network(f"{base}/30")
        self.agent_ip = str(base + 1)
        self.viewer_ip = str(base + 2)
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._made_netns_etc = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> NetnsPair:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create(self) -> None:
        if shutil.which(IP) is None:
            raise NetnsUnavailable("the `ip` command (Debian package iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (ip netns add)")
        for ns in (self.agent_ns, self.viewer_ns):
            done = _ip("netns", "add", ns)
            if done.returncode != 0:
                raise NetnsUnavailable(f"ip netns add {ns} failed: {done.stderr.strip()}")
            self._created.append(ns)
            etc = NETNS_ETC / ns
            self._made_netns_etc = self._made_netns_etc or not NETNS_ETC.exists()
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(RESOLV_CONF)
        _ip_ok(
            "link", "add", self.agent_if, "netns", self.agent_ns,
            "type", "veth", "peer", "name", self.viewer_if, "netns", self.viewer_ns,
        )
        sides = (
            (self.agent_ns, self.agent_if, self.agent_ip, self.viewer_ip),
            (self.viewer_ns, self.viewer_if, self.viewer_ip, self.agent_ip),
        )
        prefix = self.subnet.prefixlen
        for ns, ifname, address, peer in sides:
            # IPv4 only. An IPv6 link-local address would become valid a second or two after
            # the link is up (duplicate address detection), and Chromium aborts a page load
            # in progress when an address changes (net::ERR_NETWORK_CHANGED).
            if _ip("netns", "exec", ns, "sh", "-c", _NO_IPV6).returncode != 0:
                raise NetnsUnavailable("cannot turn IPv6 off in a namespace (/proc/sys read-only)")
            _ip_ok("-n", ns, "link", "set", "lo", "up")
            _ip_ok("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", ifname)
            _ip_ok("-n", ns, "link", "set", ifname, "up")
            _ip_ok("-n", ns, "route", "add", "default", "via", peer, "dev", ifname)
            _ip_ok("-n", ns, "route", "add", MULTICAST, "dev", ifname)

    def close(self) -> None:
        """End the processes started in the namespaces, then delete the namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        self._procs.clear()
        for ns in self._created:
            # Whatever still runs inside was started by this test (children of our processes).
            pids = _ip("netns", "pids", ns).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self._created):
            _ip("netns", "del", ns)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        if self._made_netns_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only when empty: other pairs may be running
        self._created.clear()

    # -- running things inside ---------------------------------------------------------------

    def _namespace(self, ns: str) -> str:
        names = {"agent": self.agent_ns, "viewer": self.viewer_ns}
        name = names.get(ns, ns)
        if name not in (self.agent_ns, self.viewer_ns):
            raise ValueError(f"{ns!r} is not a namespace of this pair")
        return name

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NS`` (``ns`` may be "agent" or "viewer")."""
        return [IP, "netns", "exec", self._namespace(ns), *argv]

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; it is ended when the pair closes, if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``argv`` inside ``ns`` (default timeout 30 s)."""
        kw.setdefault("timeout", 30)
        return subprocess.run(self.command(ns, argv), check=kw.pop("check", False), **kw)

    def ip_of(self, ns: str) -> str:
        return self.agent_ip if self._namespace(ns) == self.agent_ns else self.viewer_ip

    def serve_directory(self, ns: str, directory: Path | str, port: int = 8000) -> str:
        """Serve ``directory`` over HTTP from ``ns``'s veth address; returns the base URL."""
        host = self.ip_of(ns)
        proc = self.popen(
            ns,
            [sys.executable, "-u", "-m", "http.server", str(port), "--bind", host,
             "--directory", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        wait_for_output(proc, "Serving HTTP", timeout=10)
        return f"http://{host}:{port}/"


def wait_for_output(proc: subprocess.Popen[str], marker: str, timeout: float = 10.0) -> str:
    """Read ``proc``'s stdout (text mode) until a line contains ``marker``; return what was read.

    Raises ``RuntimeError`` when the process exits or ``timeout`` passes first.
    """
    stdout = proc.stdout
    if stdout is None:
        raise ValueError("start the process with stdout=subprocess.PIPE, text=True")
    lines: list[str] = []
    found = threading.Event()
    finished = threading.Event()

    def read() -> None:
        for line in stdout:
            lines.append(line)
            if marker in line:
                found.set()
                break
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    finished.wait(timeout)
    if not found.is_set():
        raise RuntimeError(
            f"no {marker!r} from {proc.args!r} within {timeout} s "
            f"(exit status {proc.poll()}): {''.join(lines)[-2000:]}"
        )
    return "".join(lines)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A fresh ``NetnsPair``; skips when namespaces cannot be created on this machine."""
    pair = NetnsPair()
    try:
        pair.__enter__()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        yield pair
    finally:
        pair.close()
