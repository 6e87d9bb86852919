"""The daemon as an installer runs it: `therelay-agent run`, on loopback only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import remember


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, tmp: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "THERELAY_STATE_DIR": str(tmp / "state"),
                    "THERELAY_HTTP_LISTEN": f"127.0.0.1:{self.port}",
                    "THERELAY_LOG_FORMAT": "json", "THERELAY_AGENT_ID": "site1"}
        self.log = tmp / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        self._err = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True)

    def read_token(self) -> str:
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(2)]
        (token,) = remember("".join(lines))
        assert "shown once" in lines[0]
        return token

    def get(self, path: str) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.port}{path}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
            except (ConnectionRefusedError, urllib.error.URLError):
                time.sleep(0.1)
        raise AssertionError("the daemon never answered")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args], env=self.env, text=True,
                              capture_output=True, input=stdin, timeout=60, check=False)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=10)
        self._err.close()
        return code


def test_quick_start_run_serves_health_and_stops_cleanly(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    token = daemon.read_token()
    status, body = daemon.get("/healthz")
    assert status == 200 and body["status"] == "ok" and body["agent_id"] == "site1"
    status, body = daemon.get("/no/such/page")
    assert status == 404 and body["error"] == "not_found"
    check = daemon.cli("token", "check", "-", "--camera", "demo", stdin=token)
    assert check.returncode == 0 and check.stdout.startswith("granted")
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events[-2:] == ["agent_stopping", "agent_stopped"]
    assert "Traceback" not in log

    # A second quick start revokes the first quick-start token and prints a new one.
    again = Daemon(tmp_path)
    second = again.read_token()
    assert second != token
    assert again.cli("token", "check", "-", "--camera", "demo", stdin=token).stdout.startswith(
        "denied: revoked")
    assert again.cli("token", "check", "-", "--camera", "demo", stdin=second).returncode == 0
    assert again.stop() == 0


def test_a_stop_while_starting_is_clean(tmp_path: Path) -> None:
    """systemd may stop the agent while it is still starting (its HTTP listener answers
    before the start is over): SIGTERM right after the quick-start token is printed, before
    the listeners are up, ends it as cleanly as later (it used to kill it: exit -15)."""
    daemon = Daemon(tmp_path)
    daemon.read_token()
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events[-2:] == ["agent_stopping", "agent_stopped"]
    assert "Traceback" not in log


def test_with_a_config_file_no_token_is_created(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("cameras:\n  - {id: door, source: 'rtsp://10.0.0.1/s'}\n")
    daemon = Daemon(tmp_path, "--config", str(config))
    status, _ = daemon.get("/healthz")
    assert status == 200
    assert daemon.stop() == 0
    assert daemon.proc.stdout is not None and daemon.proc.stdout.read() == ""
    listed = daemon.cli("token", "list", "--json", "--config", str(config))
    assert json.loads(listed.stdout) == []


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        daemon = Daemon(tmp_path, port=busy.getsockname()[1])
        daemon.read_token()
        assert daemon.proc.wait(timeout=30) == 1
    daemon._err.close()
    log = daemon.log.read_text()
    assert "cannot listen on 127.0.0.1" in log and "Traceback" not in log


@pytest.mark.parametrize("bad", ["cameras: [", "tokens: {max_activ: 3}"])
def test_an_invalid_config_is_refused_before_start(tmp_path: Path, bad: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(bad)
    daemon = Daemon(tmp_path, "--config", str(config))
    assert daemon.proc.wait(timeout=30) == 2
    daemon._err.close()
    log = daemon.log.read_text()
    assert log.startswith("error: ") and "Traceback" not in log
