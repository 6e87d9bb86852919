"""Faults under the state database, worded for the installer: a full disk (a small tmpfs
mounted by the test), a read-only filesystem, and the database file removed under a running
daemon. One line, a non-zero exit, no traceback; the daemon says it loudly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs at ``where``, mounted for one test."""
    where.mkdir(exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk") as where:
        yield where


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "THERELAY_STATE_DIR": str(state), "THERELAY_CONFIG": "/nonexistent"}
    env.pop("THERELAY_CONFIG")
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False)


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode != 0, done.stdout
    out = done.stderr.strip()
    assert "Traceback" not in out + done.stdout, out
    assert "cannot rollback" not in out
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


def test_a_full_disk_is_one_clear_line(small_disk: Path) -> None:
    state = small_disk / "state"
    done = cli(state, "token", "create", "--camera", "demo", "--json")
    assert done.returncode == 0, done.stderr
    fill(small_disk)
    line = one_line_error(cli(state, "token", "create", "--camera", "demo", "--json"),
                          "is full", "df -h")
    assert str(state) in line
    # space freed: the token made before is there, and nothing of the failed one
    (small_disk / "filler").unlink()
    listed = cli(state, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 1


def test_a_read_only_database_is_one_clear_line(small_disk: Path) -> None:
    state = small_disk / "state"
    assert cli(state, "token", "create", "--camera", "demo").returncode == 0
    remounted = _mount("-o", "remount,ro", str(small_disk))
    assert remounted.returncode == 0, remounted.stderr
    one_line_error(cli(state, "token", "create", "--camera", "demo"), "read-only")
    # the daemon refuses to start the same way (no traceback in what it prints)
    one_line_error(cli(state, "run"), "read-only")


def test_a_database_removed_under_the_daemon_is_noticed(tmp_path: Path) -> None:
    agent = asyncio.run(AgentProcess.start(tmp_path, [{"id": "demo", "source": "testsrc://"}]))
    try:
        database = Path(agent.env["THERELAY_STATE_DIR"]) / "agent.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        deadline = time.monotonic() + 15
        health: dict[str, object] = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{agent.base}/healthz", timeout=5) as r:
                health = json.loads(r.read())
            if health["status"] == "degraded":
                break
            time.sleep(0.5)
        assert health["status"] == "degraded", health
        assert "was removed" in str(health["problems"])
        lost = [e for e in agent.log_events() if e.get("event") == "state_database_lost"]
        assert lost and lost[0]["level"] == "error", lost
        report = json.loads(asyncio.run(agent.cli("doctor", "--json")).stdout)
        http = next(c for c in report["checks"] if c["check"] == "http")
        assert http["status"] == "fail" and "was removed" in http["finding"], http
    finally:
        asyncio.run(agent.stop())


def test_a_full_disk_under_the_daemon_is_a_503_not_a_traceback(tmp_path: Path) -> None:
    """The daemon's state_dir on a 2 MiB tmpfs (its log elsewhere); filled while it runs.
    Creating a token through the admin API says why it failed; viewing goes on."""
    with tmpfs(tmp_path / "state", "2m") as state:
        agent = asyncio.run(AgentProcess.start(tmp_path, [{"id": "demo", "source": "testsrc://"}]))
        try:
            _, admin = asyncio.run(agent.token("--admin"))
            fill(state)
            request = urllib.request.Request(
                f"{agent.base}/api/v1/admin/tokens", method="POST",
                data=json.dumps({"camera": "demo"}).encode(),
                headers={"Authorization": f"Bearer {admin}",
                         "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=15)
            body = json.loads(caught.value.read())
            assert caught.value.code == 503 and body["error"] == "storage_unavailable", body
            assert "is full" in body["message"]
            failed = [e for e in agent.log_events() if e.get("event") == "state_database_failed"]
            assert failed and "is full" in failed[0]["error"]
            with urllib.request.urlopen(f"{agent.base}/healthz", timeout=5) as r:
                assert r.status == 200
        finally:
            asyncio.run(agent.stop())  # fails on any traceback in the daemon's log
