"""Avahi as a real third-party mDNS peer, inside one namespace of a ``NetnsPair``.

avahi-daemon and its clients talk over the D-Bus *system* bus, whose socket path
(``/run/dbus/system_bus_socket``) and avahi's own runtime directory (``/run/avahi-daemon``)
are compiled in. ``ip netns exec`` shares nothing but the network, so to stay off the host's
``/run``, D-Bus and avahi, ``Avahi`` first starts a holder process in a mount namespace of
its own (``unshare --mount --propagation private``) that mounts private tmpfs over ``/run``
and ``/etc/avahi/services`` (no static services of the host get published). Every other
process — a private ``dbus-daemon``, ``avahi-daemon --no-drop-root --no-chroot
--no-rlimits`` with its own config file (only the veth, IPv4 only, no workstation/HINFO
records, a host name of its own), ``avahi-publish-service``, ``avahi-browse`` — joins that
holder's mount and network namespaces with ``nsenter``. Nothing is written outside the
test's directory and the holder's tmpfs; everything ends with ``close()``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.support.netns import NetnsPair

NEEDED = ("avahi-daemon", "avahi-publish-service", "avahi-browse", "dbus-daemon", "unshare",
          "nsenter", "stdbuf")

HOLDER = (
    "mount -t tmpfs -o mode=0755 tr-avahi-run /run"
    " && mkdir -p /run/dbus /run/avahi-daemon"
    " && mount -t tmpfs -o mode=0755 tr-avahi-services /etc/avahi/services"
    " && echo holder-ready && exec sleep infinity"
)

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- a private system bus for one test's avahi: only root processes of the test use it -->
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = """[server]
host-name={host}
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
ratelimit-interval-usec=0
ratelimit-burst=0

[wide-area]
enable-wide-area=no

[publish]
publish-addresses=yes
publish-hinfo=no
publish-workstation=no
publish-domain=no
publish-aaaa-on-ipv4=no
publish-a-on-ipv6=no

[reflector]
enable-reflector=no
"""


class AvahiUnavailable(RuntimeError):
    """A program avahi needs here is missing."""


def missing_programs() -> list[str]:
    return [name for name in NEEDED if shutil.which(name) is None]


@dataclass(frozen=True)
class BrowseEntry:
    """One resolved line of ``avahi-browse -rp``."""

    interface: str
    name: str
    service_type: str
    host: str
    address: str
    port: int
    txt: dict[str, str]


def _unescape(text: str) -> str:
    """avahi-browse -p escapes bytes as ``\\DDD`` (decimal) and ``.``/``\\`` with a backslash."""
    out = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), text)
    return re.sub(r"\\(.)", r"\1", out)


def parse_browse_line(line: str) -> BrowseEntry | None:
    """A ``=;iface;IPv4;name;type;domain;host;address;port;"k=v" "k=v"`` line, else None."""
    fields = line.rstrip("\n").split(";", 9)
    if len(fields) < 10 or fields[0] != "=":
        return None
    txt: dict[str, str] = {}
    for item in re.findall(r'"((?:[^"\\]|\\.)*)"', fields[9]):
        key, _, value = _unescape(item).partition("=")
        txt[key] = value
    return BrowseEntry(interface=fields[1], name=_unescape(fields[3]), service_type=fields[4],
                       host=fields[6], address=fields[7], port=int(fields[8]), txt=txt)


class Avahi:
    """``with Avahi(pair, "viewer", tmp_path) as avahi:`` — avahi-daemon running in ``ns``."""

    def __init__(self, pair: NetnsPair, ns: str, workdir: Path) -> None:
        self.pair = pair
        self.ns = ns
        self.interface = pair.viewer_if if pair.ip_of(ns) == pair.viewer_ip else pair.agent_if
        self.address = pair.ip_of(ns)
        self.host = f"trcam-{secrets.token_hex(3)}"
        self.dir = workdir / f"avahi-{self.host}"
        self.dir.mkdir(parents=True)
        self._holder: subprocess.Popen[str] | None = None
        self._dbus: subprocess.Popen[Any] | None = None
        self.daemon: subprocess.Popen[Any] | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: list[IO[str]] = []
        self._starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Avahi:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        missing = missing_programs()
        if missing:
            raise AvahiUnavailable(f"not installed: {', '.join(missing)}")
        (self.dir / "dbus.conf").write_text(DBUS_CONFIG)
        (self.dir / "avahi-daemon.conf").write_text(
            AVAHI_CONFIG.format(host=self.host, interface=self.interface))
        holder = self.pair.popen(
            self.ns, ["unshare", "--mount", "--propagation", "private", "sh", "-c", HOLDER],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._holder = holder
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if "holder-ready" not in line:
            raise RuntimeError(f"the avahi namespace holder failed: {line}{holder.stdout.read()}")
        # nsenter must enter the holder's private mount namespace, not that of a parent: the
        # pid is the holder itself only if `ip netns exec` and `unshare` exec'd without forking.
        mounts = Path(f"/proc/{holder.pid}/mounts").read_text()
        if "tr-avahi-run /run " not in mounts or "tr-avahi-run" in Path("/proc/mounts").read_text():
            raise RuntimeError("the avahi namespace holder has no private /run: refusing to "
                               "start dbus/avahi in a mount namespace that may be the host's")
        self._dbus = self._spawn("dbus", ["dbus-daemon", f"--config-file={self.dir / 'dbus.conf'}",
                                          "--nofork", "--nopidfile"])
        self._wait_for(lambda: self._exists("/run/dbus/system_bus_socket"), "the D-Bus socket")
        self.start_daemon()

    def start_daemon(self) -> None:
        """Start avahi-daemon (again, after ``crash``) and wait until it has its host name."""
        self._starts += 1
        log = self.dir / f"avahi-daemon-{self._starts}.log"
        self.daemon = self._spawn(
            f"avahi-daemon-{self._starts}",
            ["avahi-daemon", "-f", str(self.dir / "avahi-daemon.conf"), "--no-drop-root",
             "--no-chroot", "--no-rlimits", "--no-proc-title", "--debug"], log=log)
        self._wait_for(lambda: "Server startup complete" in log.read_text(errors="replace"),
                       f"avahi-daemon startup ({log})", timeout=15)

    def close(self) -> None:
        for proc in reversed([*self._procs, *([self._holder] if self._holder else [])]):
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self._procs, *([self._holder] if self._holder else [])]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        if self._holder is not None and self._holder.stdout is not None:
            self._holder.stdout.close()
        self._holder = None
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    # -- what tests do -----------------------------------------------------------------------

    def publish(self, name: str, service_type: str, port: int,
                txt: Mapping[str, str] | None = None, host: str | None = None
                ) -> subprocess.Popen[str]:
        """``avahi-publish-service`` (on ``host``, default avahi's own name); returns once
        avahi says the name is established."""
        argv = ["stdbuf", "-oL", "avahi-publish-service", *(["-H", host] if host else []),
                name, service_type, str(port), *(f"{k}={v}" for k, v in (txt or {}).items())]
        return self._publisher(argv)

    def publish_address(self, host: str, address: str) -> subprocess.Popen[str]:
        """``avahi-publish-address``: an A record for ``host`` (no reverse PTR)."""
        return self._publisher(["stdbuf", "-oL", "avahi-publish-address", "-R", host, address])

    def _publisher(self, argv: list[str]) -> subprocess.Popen[str]:
        log = self.dir / f"publish-{len(self._procs)}.log"
        proc = self._spawn("publish", argv, log=log)
        self._wait_for(lambda: "Established under name" in log.read_text(errors="replace"),
                       f"avahi-publish-service ({log})", proc=proc)
        return proc

    def unpublish(self, proc: subprocess.Popen[Any]) -> None:
        """End a publisher politely: avahi withdraws its entries with goodbye packets."""
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=5)

    def crash(self, publishers: Sequence[subprocess.Popen[Any]] = ()) -> None:
        """SIGKILL avahi-daemon first (it sends nothing), then its publishers: as a camera that
        loses power, no goodbye reaches the network and the records stay cached elsewhere."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(timeout=5)  # reaped: its pid file is stale, not "running"
        for proc in publishers:
            proc.kill()
            proc.wait(timeout=5)

    def browse(self, service_type: str, timeout: float = 10) -> list[BrowseEntry]:
        """``avahi-browse -rpt``: what avahi resolved of ``service_type``, then exit."""
        done = subprocess.run(self._enter(["avahi-browse", "-rptk", service_type]),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"avahi-browse failed: {done.stderr}")
        entries = (parse_browse_line(line) for line in done.stdout.splitlines())
        return [e for e in entries if e is not None]

    def browse_live(self, service_type: str) -> subprocess.Popen[str]:
        """``avahi-browse -rp`` left running: ``=`` lines as services come, ``-`` as they go."""
        proc: subprocess.Popen[str] = subprocess.Popen(
            self._enter(["stdbuf", "-oL", "avahi-browse", "-rpk", service_type]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._procs.append(proc)
        return proc

    # -- helpers -----------------------------------------------------------------------------

    def _enter(self, argv: Sequence[str]) -> list[str]:
        assert self._holder is not None, "start() first"
        return ["nsenter", f"--target={self._holder.pid}", "--mount", "--net", "--", *argv]

    def _spawn(self, what: str, argv: Sequence[str], log: Path | None = None
               ) -> subprocess.Popen[Any]:
        path = log or self.dir / f"{what}.log"
        handle = path.open("w")
        self._logs.append(handle)
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/run/dbus/system_bus_socket"}
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self._enter(argv), stdout=handle, stderr=subprocess.STDOUT, env=env)
        self._procs.append(proc)
        return proc

    def _exists(self, path: str) -> bool:
        return subprocess.run(self._enter(["test", "-S", path]), check=False,
                              timeout=5).returncode == 0

    def _wait_for(self, ready: Any, what: str, timeout: float = 10,
                  proc: subprocess.Popen[Any] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {what} within {timeout} s")


def wait_until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy; that value, or None at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


__all__ = ["Avahi", "AvahiUnavailable", "BrowseEntry", "missing_programs", "parse_browse_line",
           "wait_until"]
