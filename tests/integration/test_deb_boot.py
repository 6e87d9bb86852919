"""The .deb's service under a real systemd: a Debian 12 root booted with systemd-nspawn.

Builds the amd64 package, makes a debootstrap root (tests/support/debroot.py) with systemd,
dbus and the package's Depends, boots it (tests/support/nspawn.py: loopback only inside)
and installs the package there with ``apt-get install ./x.deb``: the postinst starts the
service. Then, against the shipped unit and its whole sandbox: READY and STATUS reach
systemd, the agent answers on 127.0.0.1:8800 inside, ``systemctl reload`` adds a camera,
the watchdog is fed, the publisher token credential from /etc/credstore reaches the agent
(and is never logged), and ``systemctl stop`` ends it cleanly. Phase times are printed
(``-s`` shows them). The tests run in file order on one booted container.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.access.tokens import Kind, generate
from tests.conftest import remember
from tests.support import nspawn
from tests.support.debroot import DebRoot

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "therelay-agent"
CONFIG = "/etc/therelay-agent/config.yaml"
HEALTHZ = ("import urllib.request as u; "
           "print(u.urlopen('http://127.0.0.1:8800/healthz', timeout=10).read().decode())")

why_not = nspawn.missing_tools() or (
    "debootstrap is missing (scripts/setup-system --test)" if shutil.which("debootstrap") is None
    else "building the .deb needs dpkg-deb (apt-get install dpkg-dev)"
    if shutil.which("dpkg-deb") is None else None)
pytestmark = pytest.mark.skipif(why_not is not None, reason=str(why_not))


def _timing(phase: str, started: float) -> None:
    print(f"timing: {phase}: {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Booted]:
    """The booted root, with the package installed (and so its service started)."""
    work = tmp_path_factory.mktemp("debboot")
    debs = work / "debs"
    started = time.monotonic()
    built = subprocess.run([str(ROOT / "packaging/build-deb"), "--arch", "amd64",
                            "--out", str(debs)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    _timing("build-deb --arch amd64", started)
    (deb,) = debs.glob("*.deb")

    started = time.monotonic()
    root = DebRoot.create(work / "root")
    try:
        with root.mounted():
            root.run("apt-get", "update", "-q")
            depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                                     text=True, check=True).stdout.strip()
            # Everything from the mirror now: the container has no network but loopback.
            root.apt("satisfy", f"systemd, dbus, {depends}")
        _timing("debootstrap + systemd, dbus and the package's Depends", started)

        started = time.monotonic()
        with nspawn.boot(root.path, "therelay-test", work / "console.log",
                         bind_ro=[(debs, "/mnt/debs")]) as booted:
            try:
                booted.wait_running()
            except RuntimeError as exc:
                # Nothing of the package is involved yet: this host cannot boot containers.
                pytest.skip(f"systemd-nspawn cannot boot a container here: {exc}")
            _timing("boot to running", started)
            started = time.monotonic()
            booted.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                       f"/mnt/debs/{deb.name}")
            _timing("apt-get install ./therelay-agent.deb inside (venv, start)", started)
            yield booted
            started = time.monotonic()
        _timing("poweroff", started)
    finally:
        root.remove()


def _show(box: nspawn.Booted, *props: str) -> dict[str, str]:
    out = box.run("systemctl", "show", SERVICE, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _cursor(box: nspawn.Booted) -> str:
    out = box.run("journalctl", "--lines=0", "--show-cursor", "--quiet").stdout
    return out.strip().removeprefix("-- cursor: ")


def _journal(box: nspawn.Booted, after: str | None = None) -> str:
    return box.run("journalctl", "--unit", SERVICE, "--output=cat", "--no-pager",
                   *([f"--after-cursor={after}"] if after else [])).stdout


def _events(journal: str) -> list[dict[str, object]]:
    """The agent's JSON log lines (the unit sets THERELAY_LOG_FORMAT=json)."""
    return [json.loads(line) for line in journal.splitlines() if line.startswith("{")]


def _wait_for(box: nspawn.Booted, cursor: str, event: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        journal = _journal(box, cursor)
        if any(e.get("event") == event for e in _events(journal)) \
                or time.monotonic() > deadline:
            return journal
        time.sleep(0.3)


def _restart_with(box: nspawn.Booted, config: str) -> str:
    """Write the config, restart the service; the journal cursor from just before."""
    (box.root / CONFIG.lstrip("/")).write_text(config)  # keeps the file's owner and mode
    cursor = _cursor(box)
    box.run("systemctl", "restart", SERVICE, check=False)
    return cursor


def _problems(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e.get("level") in ("error", "critical")]


def test_the_installed_service_is_ready_and_serves(container: nspawn.Booted) -> None:
    box = container
    # Type=notify: "active" only once the agent sent READY=1, through the whole sandbox
    assert box.run("systemctl", "is-active", SERVICE, check=False).stdout.strip() == "active"
    shown = _show(box, "StatusText", "NRestarts", "Result", "MainPID", "WatchdogUSec")
    assert shown["StatusText"] == "serving 1 camera(s) on 0.0.0.0:8800"
    assert (shown["NRestarts"], shown["Result"], shown["WatchdogUSec"]) == ("0", "success", "30s")
    status = box.run("systemctl", "status", "--no-pager", SERVICE).stdout
    assert 'Status: "serving 1 camera(s) on 0.0.0.0:8800"' in status

    journal = _journal(box)
    events = _events(journal)
    started = [e for e in events if e.get("event") == "agent_started"]
    assert len(started) == 1 and started[0]["cameras"] == ["demo"], journal[-3000:]
    assert not _problems(events), journal[-3000:]
    assert "Traceback" not in journal

    health = json.loads(box.run("python3", "-c", HEALTHZ).stdout)
    assert (health["status"], health["cameras"]) == ("ok", {"idle": 1})

    # the sandbox is really applied: the agent's user, no capability, seccomp, no new privs
    pid = shown["MainPID"]
    proc_status = box.run("cat", f"/proc/{pid}/status").stdout
    fields = dict(line.split(":", 1) for line in proc_status.splitlines())
    uid = box.run("id", "-u", SERVICE).stdout.strip()
    assert fields["Uid"].split() == [uid] * 4
    assert (fields["CapEff"].strip(), fields["CapBnd"].strip()) == ("0" * 16, "0" * 16)
    assert (fields["NoNewPrivs"].strip(), fields["Seccomp"].strip()) == ("1", "2")


def test_reload_adds_a_camera_without_a_restart(container: nspawn.Booted) -> None:
    box = container
    base = (ROOT / "packaging/config.yaml").read_text()
    cursor = _restart_with(box, base)
    pid = _show(box, "MainPID")["MainPID"]
    config = box.root / CONFIG.lstrip("/")
    config.write_text(base.replace("cameras:\n", "cameras:\n  - id: second\n"
                                   "    source: testsrc://\n", 1))
    box.run("systemctl", "reload", SERVICE)
    journal = _wait_for(box, cursor, "reloaded")
    reloaded = [e for e in _events(journal) if e.get("event") == "reloaded"]
    assert reloaded and reloaded[0]["added"] == ["second"], journal[-3000:]
    assert _show(box, "MainPID")["MainPID"] == pid  # the same process: reloaded, not restarted
    health = json.loads(box.run("python3", "-c", HEALTHZ).stdout)
    assert health["cameras"] == {"idle": 2}
    assert _show(box, "StatusText")["StatusText"].startswith("serving 2 camera(s)")
    assert not _problems(_events(journal)), journal[-3000:]


def test_the_watchdog_is_fed(container: nspawn.Booted) -> None:
    box = container
    # A shorter watchdog than the shipped 30 s, so that a few periods pass in seconds: the
    # pings go through the same sandbox (seccomp, NotifyAccess=main) whatever the period.
    dropin = box.root / f"etc/systemd/system/{SERVICE}.service.d/watchdog.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=4s\n")
    try:
        box.run("systemctl", "daemon-reload")
        _restart_with(box, (ROOT / "packaging/config.yaml").read_text())
        first = _show(box, "MainPID", "NRestarts", "WatchdogUSec")
        assert first["WatchdogUSec"] == "4s"
        pings = set()
        for _ in range(12):  # three watchdog periods
            time.sleep(1)
            pings.add(_show(box, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        now = _show(box, "MainPID", "NRestarts", "ActiveState")
        assert (now["MainPID"], now["NRestarts"], now["ActiveState"]) == (
            first["MainPID"], first["NRestarts"], "active"), _journal(box)[-3000:]
        assert len(pings) >= 4, pings  # a ping every 2 s, seen at least 4 times
        assert "Watchdog timeout" not in _journal(box)
    finally:
        dropin.unlink()
        box.run("systemctl", "daemon-reload")


def test_the_publisher_token_credential_reaches_the_agent(container: nspawn.Booted) -> None:
    box = container
    token = generate(Kind.PUBLISHER).text
    remember(token)
    credstore = box.root / "etc/credstore"
    credstore.mkdir(mode=0o700, exist_ok=True)
    (credstore / "publisher-token").touch(mode=0o600)
    (credstore / "publisher-token").write_text(token + "\n")
    # a relay on loopback where nothing listens: the link keeps trying, the agent serves on
    relay = (ROOT / "packaging/config.yaml").read_text() + "relay:\n  url: ws://127.0.0.1:9/agent\n"
    try:
        cursor = _restart_with(box, relay)
        journal = _wait_for(box, cursor, "relay_unavailable")
        assert box.run("systemctl", "is-active", SERVICE, check=False).stdout.strip() == "active"
        events = _events(journal)
        started = [e for e in events if e.get("event") == "agent_started"]
        assert started and started[0]["relay"] == "ws://127.0.0.1:9/agent", journal[-3000:]
        trying = [e for e in events if e.get("event") == "relay_unavailable"]
        assert trying and "127.0.0.1" in str(trying[0]["error"]), journal[-3000:]
        health = json.loads(box.run("python3", "-c", HEALTHZ).stdout)
        assert health["relay"] == "disconnected"
        # systemd handed the agent its own copy, readable by the agent's user only
        listing = box.run("ls", "-ln", f"/run/credentials/{SERVICE}.service").stdout
        assert "-r-------- 1 " + box.run("id", "-u", SERVICE).stdout.strip() in listing
        full = box.run("journalctl", "--output=cat", "--no-pager").stdout
        assert token not in full and token[17:60] not in full  # never in any log

        # The same relay setting without the file: the service fails and says why.
        (credstore / "publisher-token").unlink()
        cursor = _restart_with(box, relay)
        deadline = time.monotonic() + 15
        failed = ""
        while "no publisher token was found" not in failed and time.monotonic() < deadline:
            time.sleep(0.3)
            failed = _journal(box, cursor)
        assert "no publisher token was found" in failed, failed[-3000:]
        assert "Traceback" not in failed
    finally:
        (credstore / "publisher-token").unlink(missing_ok=True)
        # without the file and without relay.url, the service starts again
        _restart_with(box, (ROOT / "packaging/config.yaml").read_text())
        box.run("systemctl", "reset-failed", SERVICE, check=False)
    assert box.run("systemctl", "is-active", SERVICE, check=False).stdout.strip() == "active"


def test_stop_ends_the_agent_cleanly(container: nspawn.Booted) -> None:
    box = container
    cursor = _restart_with(box, (ROOT / "packaging/config.yaml").read_text())
    assert box.run("systemctl", "is-active", SERVICE, check=False).stdout.strip() == "active"
    started = time.monotonic()
    box.run("systemctl", "stop", SERVICE)
    _timing("systemctl stop", started)
    shown = _show(box, "ActiveState", "Result", "ExecMainStatus")
    # Result=timeout would mean systemd had to kill it after TimeoutStopSec
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    journal = _journal(box, cursor)
    events = [e.get("event") for e in _events(journal)]
    assert events[-2:] == ["agent_stopping", "agent_stopped"], journal[-3000:]
    assert not _problems(_events(journal)), journal[-3000:]
