"""A viewer that lost the picture asks for a keyframe (RTCP PLI/FIR); an adopted ONVIF camera
is then asked for one too (ONVIF Media ``SetSynchronizationPoint``), so the next frame from
the camera itself is an IDR instead of one a whole GOP later.

The viewer is served at once from the hub's cached GOP either way; this request helps every
viewer that joins or recovers in the next seconds. It costs the camera an extra keyframe (a
bitrate spike for every viewer), so it is sent at most once per ``interval`` per camera,
whatever the number of viewers or PLIs, and never more than one at a time per camera. A camera
that refuses it (not every firmware implements it) is reported once and asked again only after
``interval``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog

from agent.config import read_secret
from agent.discovery.adopted import AdoptedCamera, AdoptedCameras
from agent.errors import AgentError
from agent.retry import FailureLog

log = structlog.get_logger(__name__)

#: Seconds between two requests to the same camera.
INTERVAL = 10.0
#: Seconds one request (connection, GetProfiles, SetSynchronizationPoint) may take.
TIMEOUT = 5.0


class CameraKeyframes:
    def __init__(self, adopted: AdoptedCameras, interval: float = INTERVAL,
                 timeout: float = TIMEOUT) -> None:
        self._adopted = adopted
        self._interval = interval
        self._timeout = timeout
        self._cameras: dict[str, AdoptedCamera] = {}
        self._last: dict[str, float] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, FailureLog] = {}
        self._tokens: dict[str, str] = {}  # camera id → the ONVIF profile token it streams
        self.sent = 0  # requests the cameras accepted (tests and /metrics-style reading)

    def set_cameras(self, cameras: Iterable[AdoptedCamera]) -> None:
        """The adopted cameras that can be asked: those adopted over ONVIF. A camera whose
        record changed (moved, another profile) has its profile token asked again."""
        old = self._cameras
        self._cameras = {c.id: c for c in cameras if c.method == "onvif" and c.xaddr}
        for camera_id in list(self._tokens):
            if self._cameras.get(camera_id) != old.get(camera_id):
                del self._tokens[camera_id]

    def asks(self, camera_id: str) -> bool:
        return camera_id in self._cameras

    def request(self, camera_id: str) -> bool:
        """Ask ``camera_id`` for a keyframe in the background, unless it was asked within
        the interval or is being asked now; True if a request starts."""
        camera = self._cameras.get(camera_id)
        now = time.monotonic()
        if (camera is None or camera_id in self._busy
                or now - self._last.get(camera_id, -self._interval) < self._interval):
            return False
        self._last[camera_id] = now
        task = asyncio.get_running_loop().create_task(self._ask(camera),
                                                      name=f"keyframe-{camera_id}")
        self._busy[camera_id] = task
        task.add_done_callback(lambda _t: self._busy.pop(camera_id, None))
        return True

    async def _ask(self, camera: AdoptedCamera) -> None:
        from agent.discovery.scan import load_onvif  # noqa: PLC0415 (zeep: loaded on demand)

        failures = self._failures.setdefault(
            camera.id, FailureLog(log, "camera_keyframe_request_failed", camera=camera.id))
        try:
            password = await asyncio.to_thread(
                read_secret, f"camera-{camera.id}", self._adopted.password_file(camera.id)
                if camera.username else None)
            await load_onvif()
            from agent.discovery import onvif  # noqa: PLC0415 (loaded just now)

            assert camera.xaddr is not None  # set_cameras keeps only those with one
            token = self._tokens.get(camera.id)
            if token is None:  # the profile adoption chose, asked once (GetProfiles…)
                device = await onvif.query_device(camera.xaddr, camera.username, password,
                                                  timeout=self._timeout)
                token = self._tokens[camera.id] = onvif.choose_profile(
                    device, camera.profile).token
            await onvif.set_synchronization_point(
                camera.xaddr, camera.username, password, token, timeout=self._timeout)
        except AgentError as exc:  # refused, unreachable, not supported: said once
            failures.failed(str(exc))
            return
        self.sent += 1
        failures.recovered("camera_keyframe_request_recovered")
        log.debug("camera_keyframe_requested", camera=camera.id, profile=token)

    async def close(self) -> None:
        tasks = list(self._busy.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
