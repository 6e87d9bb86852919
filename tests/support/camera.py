"""``RtspCamera``: a real RTSP camera for tests (see ``rtsp_camera.py`` next to this file).

The camera is Debian's GStreamer RTSP server driven by Debian's ``/usr/bin/python3``
(python3-gi), not by the project venv; this module only starts, watches and stops it::

    with RtspCamera.start(width=320, height=240, gop=15) as camera:
        av.open(camera.url, options=PYAV_RTSP_OPTIONS)
        camera.wait_connected(1)

Fixtures: ``rtsp_camera`` (one started camera with the defaults) and ``rtsp_camera_factory``
(start any number, with options; all stopped after the test). A test module or conftest makes
them visible with ``from tests.support.camera import rtsp_camera_fixture,
rtsp_camera_factory_fixture`` (the function names differ from the fixture names so that ruff
does not take a test's argument for a redefinition of the import). Mark tests that need it with
``needs_rtsp_server``: they are skipped, with the reason, where the system packages are absent
(``scripts/setup-system --test`` installs them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("rtsp_camera.py")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

# What the agent should use to open a camera with PyAV (see docs / field notes).
PYAV_RTSP_OPTIONS = {
    "rtsp_transport": "tcp",
    "probesize": "32",
    "analyzeduration": "0",
    "timeout": "5000000",
}

_OPTION_FLAGS = {
    "address": "--address",
    "path": "--path",
    "width": "--width",
    "height": "--height",
    "fps": "--fps",
    "gop": "--gop",
    "bitrate": "--bitrate",
    "user": "--user",
    "auth": "--auth",
    "audio": "--audio",
    "pattern": "--pattern",
    "codec": "--codec",
    "frame": "--frame",
    "session_timeout": "--session-timeout",
}
_EVENT = re.compile(r"^(READY|CLIENT_CONNECTED|CLIENT_CLOSED|STOPPED)\s+(\S+)")


@functools.cache
def gst_rtsp_server_missing() -> str | None:
    """Why the camera cannot run here (None if it can): /usr/bin/python3 + GstRtspServer."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found"
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
        " from gi.repository import Gst, GstRtspServer"
    )
    try:
        result = subprocess.run(
            [SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} cannot run: {exc}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{SYSTEM_PYTHON} cannot import gi's GstRtspServer ({last}); "
            "install the test packages with scripts/setup-system --test"
        )
    return None


needs_rtsp_server = pytest.mark.skipif(
    gst_rtsp_server_missing() is not None,
    reason=f"RTSP camera fixture unavailable: {gst_rtsp_server_missing()}",
)


class CameraError(RuntimeError):
    """The camera process did not start, or died."""


class RtspCamera:
    """One camera process. Thread-safe counters are kept by a thread reading its stdout."""

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
        netns: str | None = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(_OPTION_FLAGS)
        if unknown:
            raise TypeError(f"unknown camera options: {sorted(unknown)}")
        if ("user" in options) != (password is not None):
            raise TypeError("user and password go together")
        self.port = port or 0
        self.options = options
        self.password = password
        self.ready_timeout = ready_timeout
        self.netns = netns  # run inside this network namespace (give address= too)
        self.host = str(options.get("address", "127.0.0.1"))
        self.path = str(options.get("path", "/stream"))
        self.url = ""
        self.ready_seconds = 0.0  # time from launch to READY, last start
        self.lines: list[str] = []  # every stdout line, all runs
        self._stderr: deque[str] = deque(maxlen=50)
        self._cond = threading.Condition()
        self._connected = 0
        self._total = 0
        self._proc: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []
        self._secret_dir: str | None = None

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, port: int | None = None, **options: Any) -> RtspCamera:
        """Start a camera (on a free loopback port unless ``port``) and wait for READY.

        Options: address, path, width, height, fps, gop, bitrate, user + password (auth:
        "basic", default, or "digest"),
        audio ("none"|"pcmu"|"aac"), pattern ("smpte" scrolling, default, or "ball": ~3x the
        drawing CPU), frame ("x264", default: a delimiter and a slice per encoder thread,
        each its own RTP packet and write; or "one-nal": one slice, so a small frame is one
        packet), ready_timeout. Defaults: 640x360@30, GOP 2 s, 1000 kbit/s.
        """
        camera = cls(port, **options)
        camera._launch()
        return camera

    def restart(self) -> None:
        """Stop the camera if it runs, then start it again on the same port and path."""
        self.stop()
        self._launch()

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after STOP_TIMEOUT). Idempotent."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the camera vanishes without closing its connections cleanly."""
        self._end(signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def connected(self) -> int:
        """RTSP connections open right now."""
        with self._cond:
            return self._connected

    @property
    def total_connections(self) -> int:
        """RTSP connections accepted since this object was created (over restarts)."""
        with self._cond:
            return self._total

    def url_with_credentials(self, user: str | None = None, password: str | None = None) -> str:
        """The URL with ``user:password@`` (default: the camera's own credentials)."""
        user = user if user is not None else self.options.get("user")
        password = password if password is not None else self.password
        if user is None:
            return self.url
        auth = quote(str(user), safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return self.url.replace("rtsp://", f"rtsp://{auth}@", 1)

    def wait_connected(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until exactly ``count`` clients are connected; False on timeout."""
        return self.wait_for(lambda: self._connected == count, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait (under the counters' lock) until ``predicate()`` is true."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def stderr_tail(self) -> str:
        """The camera's last stderr lines (repeated lines once)."""
        with self._cond:
            lines = list(self._stderr)
        return "\n".join(line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1])

    # -- internals ----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        command = [SYSTEM_PYTHON, "-u", str(SCRIPT), "--port", str(self.port)]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        for name, flag in _OPTION_FLAGS.items():
            if name in self.options and self.options[name] is not None:
                command += [flag, str(self.options[name])]
        if self.password is not None:
            if self._secret_dir is None:
                self._secret_dir = tempfile.mkdtemp(prefix="rtsp-camera-creds-")
            secret = Path(self._secret_dir) / "camera-password.secret"
            secret.write_text(self.password, encoding="utf-8")
            secret.chmod(0o600)
            command += ["--password-file", str(secret)]
        return command

    def _launch(self) -> None:
        if self.running:
            raise CameraError("camera already running")
        deadline = time.monotonic() + self.ready_timeout
        with self._cond:
            self._stderr.clear()
        while True:
            status = self._launch_once(deadline)
            # Exit 3: the fixed port is still held (e.g. by a client's TIME_WAIT after a kill).
            if status != 3 or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not self.url:
            raise CameraError(
                f"camera gave no READY within {self.ready_timeout} s (last exit status "
                f"{status}): {self.stderr_tail()}"
            )

    def _launch_once(self, deadline: float) -> int | None:
        self.url = ""
        with self._cond:
            self._connected = 0
        started = time.monotonic()
        proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # a ^C in the test run does not reach it twice
        )
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        with self._cond:
            self._cond.wait_for(
                lambda: bool(self.url) or proc.poll() is not None,
                max(0.0, deadline - time.monotonic()),
            )
        if self.url:
            self.ready_seconds = time.monotonic() - started
            match = re.search(r":(\d+)/", self.url)
            if match:
                self.port = int(match.group(1))
            return None
        self._end(signal.SIGKILL)
        return proc.returncode

    def _read_stdout(self, stream: Any) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                match = _EVENT.match(line)
                if match:
                    event, value = match.groups()
                    if event == "READY":
                        self.url = value
                    elif event == "CLIENT_CONNECTED":
                        self._connected = int(value)
                        self._total += 1
                    elif event == "CLIENT_CLOSED":
                        self._connected = int(value)
                self._cond.notify_all()
        with self._cond:
            self._connected = 0
            self._cond.notify_all()

    def _read_stderr(self, stream: Any) -> None:
        for raw in stream:
            with self._cond:
                self._stderr.append(raw.rstrip("\n"))

    def _end(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._threads = []

    def _remove_secret(self) -> None:
        if self._secret_dir is not None:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
            self._secret_dir = None

    def close(self) -> None:
        """Stop and remove the temporary password file."""
        self.stop()
        self._remove_secret()

    def __repr__(self) -> str:
        return f"<RtspCamera {self.url or 'not started'} pid={self.pid} connected={self.connected}>"


@pytest.fixture(name="rtsp_camera_factory")
def rtsp_camera_factory_fixture() -> Iterator[Callable[..., RtspCamera]]:
    """Start cameras with options (``factory(width=320, user="u", password="p")``)."""
    missing = gst_rtsp_server_missing()
    if missing is not None:
        pytest.skip(f"RTSP camera fixture unavailable: {missing}")
    cameras: list[RtspCamera] = []

    def make(port: int | None = None, **options: Any) -> RtspCamera:
        camera = RtspCamera(port, **options)
        cameras.append(camera)
        camera._launch()
        return camera

    yield make
    for camera in cameras:
        camera.close()


@pytest.fixture(name="rtsp_camera")
def rtsp_camera_fixture(rtsp_camera_factory: Callable[..., RtspCamera]) -> RtspCamera:
    """A started camera with the defaults (640x360@30, 2 s GOP, no auth, no audio)."""
    return rtsp_camera_factory()
