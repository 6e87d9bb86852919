"""systemd integration: sd_notify to a socket the test provides, and the unit file's checks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import remember
from tests.support.netns import free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "therelay-agent.service"


def test_ready_watchdog_and_stopping_reach_the_notify_socket(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
           "THERELAY_STATE_DIR": str(tmp_path / "state"),
           "THERELAY_HTTP_LISTEN": f"127.0.0.1:{free_port()}", "THERELAY_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        messages: list[str] = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(listener.recv(4096).decode())
        assert "STATUS=serving 1 camera(s)" in messages[-1]
        started = time.monotonic()
        watchdogs = 0
        while watchdogs < 3:
            if listener.recv(4096).decode() == "WATCHDOG=1":
                watchdogs += 1
        assert time.monotonic() - started < 5  # every WATCHDOG_USEC / 2
        proc.send_signal(signal.SIGTERM)
        while True:
            message = listener.recv(4096).decode()
            if message.startswith("STOPPING=1"):
                break
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stdout is not None
        remember(proc.stdout.read())
        listener.close()


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is needed")


@needs_systemd
def test_the_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's agent.
    unit = tmp_path / "therelay-agent.service"
    unit.write_text(UNIT.read_text().replace(
        "/opt/therelay-agent/venv/bin/therelay-agent", str(ROOT / ".venv/bin/therelay-agent")))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, check=False)
    line = security.stdout.strip().splitlines()[-1]
    print(line)  # the figure for the record
    exposure = float(line.split("exposure level for therelay-agent.service:")[1].split()[0])
    assert exposure <= 2.0
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                   "LoadCredential=publisher-token\n", "StateDirectory=therelay-agent",
                   "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
                   "CapabilityBoundingSet=\n", "NoNewPrivileges=yes"):
        assert needed in text, needed
