"""``relay.publish: always``: cameras published continuously to a WHIP URL template.

Works with any standard WHIP server (MediaMTX, go2rtc, Janus, Cloudflare…) and needs no
control channel. Each camera has a supervisor that publishes, waits for the session to
fail, and publishes again with the agent's backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from agent.media.cameras import Camera
from agent.retry import FailureLog, backoff
from agent.stopping import cancel_and_wait
from agent.webrtc import stack

if TYPE_CHECKING:  # the WebRTC stack loads when publishing starts (agent/webrtc/stack.py)
    from aiortc import RTCConfiguration

    from agent.webrtc.whip import WhipPublisher

log = structlog.get_logger(__name__)

#: A session live this long that fails is published again at once; a shorter one waits
#: the backoff, so a server that drops every session at once is not hammered.
REPUBLISH_AT_ONCE_AFTER = 10.0


class AlwaysPublisher:
    def __init__(self, cameras: list[Camera], template: str, agent_id: str, bearer: str,
                 configuration: Callable[[], RTCConfiguration], direct: bool = True) -> None:
        self._cameras = cameras
        self._direct = direct  # webrtc.send_path: agent
        self._template = template
        self._agent_id = agent_id
        self._bearer = bearer
        self._configuration = configuration
        self._tasks: list[asyncio.Task[None]] = []
        self.live: dict[str, WhipPublisher] = {}

    def url(self, camera_id: str) -> str:
        return self._template.format(agent_id=self._agent_id, camera_id=camera_id)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise(c), name=f"whip-{c.id}")
                       for c in self._cameras]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        publishers, self.live = list(self.live.values()), {}
        await asyncio.gather(*(p.stop() for p in publishers), return_exceptions=True)

    async def _supervise(self, camera: Camera) -> None:
        url = self.url(camera.id)
        failures = FailureLog(log, "whip_always_unavailable", camera=camera.id)
        delays = backoff(1.0, 60.0)
        await stack.load()
        from agent.webrtc.whip import WhipPublisher  # noqa: PLC0415 (loaded just now)

        while True:
            publisher = WhipPublisher(camera.hub, url, self._bearer, self._configuration(),
                                      direct=self._direct)
            try:
                await publisher.start(timeout=15)
                await asyncio.wait_for(publisher.connected.wait(), 15)
            except Exception as exc:  # WhipError, ICE timeout, or anything aiortc raises
                failures.failed(f"{getattr(exc, 'code', type(exc).__name__)}: {exc}")
                await publisher.stop()
                await asyncio.sleep(next(delays))
                continue
            self.live[camera.id] = publisher
            failures.recovered("whip_always_live")
            log.info("whip_always_publishing", camera=camera.id)
            loop = asyncio.get_running_loop()
            went_live = loop.time()
            try:
                await publisher.failed.wait()
            finally:
                self.live.pop(camera.id, None)
                await publisher.stop()
            log.warning("whip_always_lost", camera=camera.id, error=publisher.failure)
            if loop.time() - went_live >= REPUBLISH_AT_ONCE_AFTER:
                # It had been working: publish again at once (the server may be back
                # already), and failures from here on start the schedule afresh.
                delays = backoff(1.0, 60.0)
                continue
            await asyncio.sleep(next(delays))  # it keeps failing soon: back off
