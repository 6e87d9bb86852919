"""A clean Debian 12 root made with debootstrap, for installing the .deb into (root only).

The mirror is the one the host's apt uses (so it works where only Debian's package registry
is reachable), with the host's apt proxy and Valid-Until settings. Commands inside the root
run with /proc mounted (``mounted()`` unmounts it in every case); commands that run the agent
itself get a network namespace of their own with only loopback (``net=False``), so nothing
the agent does can reach the host's network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
       "DEBIAN_FRONTEND": "noninteractive"}
# Paths that change whatever is installed; the before/after file lists ignore them.
VOLATILE = ("proc", "dev", "sys", "run", "tmp", "var/cache", "var/lib/apt", "var/lib/dpkg",
            "var/log", "etc/ld.so.cache")


def _sources(text: str) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each ``deb`` entry, one-line or deb822 format."""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields[:1] == ["deb"]:
            rest = [f for f in fields[1:] if not f.startswith("[")]
            if len(rest) >= 2:
                yield rest[0], [rest[1]]
    for stanza in re.split(r"\n\s*\n", text):
        keys = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
        if "deb" in keys.get("Types", "").split() and keys.get("Enabled", "yes") != "no":
            for uri in keys.get("URIs", "").split():
                yield uri, keys.get("Suites", "").split()


def host_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror for bookworm itself (not -security or -updates)."""
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for path in files:
        if path.is_file():
            for uri, suites in _sources(path.read_text(errors="replace")):
                if SUITE in suites and uri.startswith(("http://", "https://", "file:/")):
                    return uri
    return FALLBACK_MIRROR


def host_apt_settings() -> list[str]:
    """apt.conf lines to carry into the root: the proxy, and Valid-Until for snapshots."""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                          check=False).stdout
    keep = ("Acquire::http::Proxy ", "Acquire::https::Proxy ", "Acquire::Check-Valid-Until ",
            "Acquire::Check-Date ")
    return [line for line in dump.splitlines() if line.startswith(keep)]


def _proxy_env(settings: list[str]) -> dict[str, str]:
    env = {}
    for line in settings:
        match = re.match(r'Acquire::(https?)::Proxy "(.+)";', line)
        if match and match.group(2) not in ("DIRECT", "false"):
            env[f"{match.group(1)}_proxy"] = match.group(2)
    return env


class DebRoot:
    """A Debian root directory and the means to run commands in it."""

    def __init__(self, path: Path, proxy: dict[str, str]) -> None:
        self.path = path
        self.proxy = proxy

    @classmethod
    def create(cls, path: Path) -> DebRoot:
        settings = host_apt_settings()
        proxy = _proxy_env(settings)
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(path), host_mirror()],
                       check=True, capture_output=True, env={**os.environ, **proxy})
        (path / "etc/apt/apt.conf.d/99from-host").write_text(
            "".join(line + "\n" for line in settings))
        return cls(path, proxy)

    @contextmanager
    def mounted(self) -> Iterator[DebRoot]:
        """/proc mounted inside the root for the duration (Python and dpkg need it)."""
        proc = self.path / "proc"
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        try:
            yield self
        finally:
            subprocess.run(["umount", "--lazy", str(proc)], check=False)

    def run(self, *cmd: str, net: bool = True, check: bool = True,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the root; ``net=False``: in a new netns with loopback only."""
        inner = ["chroot", str(self.path), "env", "-i",
                 *(f"{k}={v}" for k, v in {**ENV, **self.proxy}.items())]
        if user:
            inner += ["runuser", "-u", user, "--"]
        argv = [*inner, *cmd]
        if not net:
            argv = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0",
                        "--no-install-recommends", *args)

    def files(self) -> set[str]:
        """Every path in the root (relative), except the ones apt, dpkg and logs churn."""
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.path):
            rel = os.path.relpath(dirpath, self.path)
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if not (rel + d).startswith(VOLATILE)]
            found.update(rel + name for name in (*dirnames, *filenames)
                         if not (rel + name).startswith(VOLATILE))
        return found

    def remove(self) -> None:
        """Delete the root, unless something is still mounted inside it."""
        mounts = Path("/proc/mounts").read_text().split()
        if any(m.startswith(str(self.path) + "/") for m in mounts):
            raise RuntimeError(f"{self.path} still has mounts: not deleting it")
        shutil.rmtree(self.path, ignore_errors=True)
