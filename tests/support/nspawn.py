"""Boot a Debian root with a real systemd as its PID 1 (systemd-nspawn), loopback only.

The container has a network namespace of its own with nothing but ``lo``
(``--private-network``), so what runs inside reaches neither the host's network nor
anything outside. It is not registered with systemd-machined and keeps the caller's
cgroup (``--register=no --keep-unit``): that works whether or not the host runs systemd
(the sandbox these tests were written in has no systemd at all). nspawn then splits the
cgroup it is started in into ``supervisor`` and ``payload``, so it is started in a cgroup
made for it (``Booted.cgroups``), removed once the container is gone, rather than in the
caller's own.

Commands run inside with ``nsenter --all`` into the container's PID 1: they see its mount,
PID, network and cgroup namespaces, talk to its systemd, and use its binaries.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

BOOT_TIMEOUT = 90.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


def missing_tools() -> str | None:
    """Why the container cannot be booted here, decided before trying; None if it may."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install {package})"
    return None


def _cgroup_dirs(name: str) -> list[Path]:
    """A new cgroup ``name`` under this process's cgroup, in the unified hierarchy and in
    the named ``systemd`` one when the host mounts both (a "hybrid" host)."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            mounts.setdefault("", Path(fields[4]))
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            mounts.setdefault("name=systemd", Path(fields[4]))
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in mounts:
            dirs.append(mounts[controllers] / path.lstrip("/") / name)
    return dirs


class Booted:
    """A running container: ``run`` executes a command inside it, as root. Its files are
    those of ``root`` on the host (no overlay): writing there is writing inside."""

    def __init__(self, root: Path, name: str, proc: subprocess.Popen[bytes], log: Path,
                 cgroups: list[Path]) -> None:
        self.root = root
        self.name = name
        self.proc = proc
        self.log = log
        self.cgroups = cgroups
        self.leader = 0

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", "--target", str(self.leader), "--all", "env", "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", "SYSTEMD_PAGER=",
                "DEBIAN_FRONTEND=noninteractive", *cmd]
        result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode} in the "
                                 f"container:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def _find_leader(self, deadline: float) -> int:
        # nspawn's child forks the container's PID 1 and exits: PID 1 is the only child
        # of nspawn left that runs systemd.
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline and self.proc.poll() is None:
            for pid in children.read_text().split():
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except OSError:
                    continue
            time.sleep(0.1)
        raise RuntimeError(f"no systemd started in the container:\n{self.console()[-3000:]}")

    def wait_running(self) -> str:
        """Wait for the boot to finish; the system state (``running`` or ``degraded``)."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.leader = self._find_leader(deadline)
        state = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            # Fails with "Failed to connect to bus" until systemd listens on its socket.
            result = self.run("systemctl", "is-system-running", "--wait", check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        raise RuntimeError(f"the container did not finish booting (state {state!r}):\n"
                           f"{self.console()[-3000:]}")

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the container down (SIGTERM makes nspawn ask its systemd to power off);
        SIGKILL if it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for top in self.cgroups:
            # Depth first: the container's own slices and scopes, then nspawn's two. One
            # still busy (a process left after a SIGKILL) stays rather than hide the error
            # the test is failing with.
            dirs = [p for p in top.rglob("*") if p.is_dir()]
            for path in [*sorted(dirs, key=lambda p: len(p.parts), reverse=True), top]:
                with suppress(OSError):
                    path.rmdir()


@contextmanager
def boot(root: Path, name: str, log: Path,
         bind_ro: Sequence[tuple[Path, str]] = ()) -> Iterator[Booted]:
    """Boot ``root`` (which has systemd and dbus installed) as container ``name``; its
    console goes to ``log``. Powered off on leaving, whatever happened."""
    cgroups = _cgroup_dirs(f"therelay-nspawn-{name}-{os.getpid()}")
    for path in cgroups:
        path.mkdir()
    # A shell moves itself into the new cgroups, then execs nspawn there.
    into_cgroups = ["sh", "-c", 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; '
                    'shift; n=$((n - 1)); done; exec "$@"', "sh", str(len(cgroups)),
                    *(str(path / "cgroup.procs") for path in cgroups)]
    argv = ["systemd-nspawn", "--boot", "--directory", str(root), "--machine", name,
            "--private-network", "--register=no", "--keep-unit", "--console=passive",
            *(f"--bind-ro={src}:{dest}" for src, dest in bind_ro)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*into_cgroups, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    booted = Booted(root, name, proc, log, cgroups)
    try:
        yield booted
    finally:
        booted.poweroff()
