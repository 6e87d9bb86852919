"""Cameras that are not what they claim, on loopback: an attacker answering RTSP ``401 Basic``,
a port streaming junk, a silent port, a camera whose stream never starts. Each open ends in
bounded time with the installer's reason, the password never goes in clear where Digest is
required, and repeated attempts leak no thread and no socket."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import CameraConfig, RtspAuth
from agent.errors import SourceError
from agent.media.hub import CameraHub
from agent.media.sources import make_source, rtsp_login
from tests.conftest import write_secret
from tests.support.netns import free_port, wait_for_output

PASSWORD = "hunter2-Camera"
TIMEOUT = 1.0  # media.camera_timeout for these cameras


class Trap:
    """tests/support/rtsp_trap.py on loopback, with what it received."""

    def __init__(self, mode: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.rtsp_trap", mode, "127.0.0.1",
             str(self.port)], stdout=subprocess.PIPE, text=True)
        wait_for_output(self.proc, "listening", timeout=10)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/stream"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def trap(request: pytest.FixtureRequest) -> Iterator[Trap]:
    t = Trap(request.param)
    yield t
    t.close()


def camera(url: str, tmp: Path, rule: RtspAuth = "auto", camera_id: str = "cam",
           credentials: bool = True) -> CameraConfig:
    if not credentials:  # asked nothing first: the reason is found after FFmpeg fails
        return CameraConfig(id=camera_id, source=url)
    secret = tmp / "pw"
    write_secret(secret, PASSWORD)
    return CameraConfig(id=camera_id, source=url, username="admin", password_file=secret,
                        rtsp_auth=rule)


def open_error(config: CameraConfig) -> tuple[str, float]:
    source = make_source(config, TIMEOUT)
    started = time.monotonic()
    try:
        with pytest.raises(SourceError) as caught:
            source.open()
    finally:
        source.close()
    return str(caught.value), time.monotonic() - started


@pytest.mark.parametrize("trap", ["basic"], indirect=True)
def test_a_basic_challenge_gets_no_password_where_digest_is_required(
    trap: Trap, tmp_path: Path
) -> None:
    # a moved camera (rule digest) and a camera that used Digest before (remembered)
    rtsp_login.MEMORY.note("was-digest", "digest")
    for config in (camera(trap.url, tmp_path, "digest"),
                   camera(trap.url, tmp_path, "auto", camera_id="was-digest")):
        message, took = open_error(config)
        assert "RTSP Basic" in message and "the password was not sent" in message, message
        assert PASSWORD not in message and took < TIMEOUT * 3
    time.sleep(0.2)
    requests = [line for line in trap.lines if "request" in line]
    assert requests and all(line["authorization"] is None for line in requests), requests


@pytest.mark.parametrize("trap", ["basic"], indirect=True)
def test_basic_is_answered_where_the_installer_allows_it(trap: Trap, tmp_path: Path) -> None:
    """The control for the test above: the same listener does get Basic when allowed (so
    the refusal is what kept the password back)."""
    message, _ = open_error(camera(trap.url, tmp_path, "basic"))
    assert "refused the credentials" in message, message
    time.sleep(0.2)
    assert any(line.get("authorization", "") and line["authorization"].startswith("Basic ")
               for line in trap.lines), trap.lines


@pytest.mark.parametrize("credentials", [True, False])
@pytest.mark.parametrize("trap", ["junk"], indirect=True)
def test_a_junk_stream_is_named(trap: Trap, tmp_path: Path, credentials: bool) -> None:
    message, took = open_error(camera(trap.url, tmp_path, credentials=credentials))
    assert message == rtsp_login.NOT_RTSP
    assert took < (TIMEOUT if credentials else TIMEOUT * 3 + 1)


@pytest.mark.parametrize("credentials", [True, False])
@pytest.mark.parametrize("trap", ["silent"], indirect=True)
def test_a_silent_camera_is_a_timeout(trap: Trap, tmp_path: Path, credentials: bool) -> None:
    message, took = open_error(camera(trap.url, tmp_path, credentials=credentials))
    assert message == rtsp_login.TIMEOUT
    assert TIMEOUT * 0.9 <= took < (TIMEOUT * 2 if credentials else TIMEOUT * 3 + 1)


@pytest.mark.parametrize("trap", ["sdp-junk"], indirect=True)
def test_an_open_that_never_completes_ends_at_the_deadline(trap: Trap, tmp_path: Path) -> None:
    """DESCRIBE looks fine, then SETUP gets endless junk: bytes keep coming, so FFmpeg's
    socket timeout never fires; the open deadline (3 x camera_timeout) ends it."""
    message, took = open_error(camera(trap.url, tmp_path))
    assert "did not deliver a stream" in message, message
    assert took < TIMEOUT * 3 + 1.5, took


def _pulls() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("camera-"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("trap", ["sdp-junk"], indirect=True)
def test_ten_attempts_leave_threads_and_sockets_flat(trap: Trap, tmp_path: Path) -> None:
    """Ten requests at once, then ten attempts one after another, each given up on, at a
    camera stuck in its open: one pull thread at most, no socket left behind."""
    config = camera(trap.url, tmp_path)

    async def attempts() -> tuple[int, int, int]:
        hub = CameraHub("cam", lambda: make_source(config, TIMEOUT), idle_grace=0.0,
                        always_on=False, gop_cache=True, queue_packets=50, reconnect_max=1.0)
        fds = _fds()
        # ten requests at once: one pull
        consumers = [hub.subscribe() for _ in range(10)]
        await asyncio.gather(*(hub.ready(0.3) for _ in consumers))
        peak = _pulls()
        for consumer in consumers:
            hub.unsubscribe(consumer)
        for _ in range(10):
            consumer = hub.subscribe()
            await hub.ready(0.3)
            hub.unsubscribe(consumer)  # idle_grace 0: told to stop while still opening
            await asyncio.sleep(0.05)
            peak = max(peak, _pulls())
        await hub.close()
        await asyncio.sleep(0.5)
        return peak, _pulls(), _fds() - fds

    peak, threads_after, fds_after = asyncio.run(attempts())
    assert peak <= 1, peak
    assert threads_after <= 0 and fds_after <= 0, (threads_after, fds_after)
    connections = [line for line in trap.lines if "connection" in line]
    # each open makes two connections (the challenge, then FFmpeg), and each takes 3 s here:
    # a handful of opens in those seconds, never one per request
    assert len(connections) <= 2 * 5, connections
