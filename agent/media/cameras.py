"""The agent's cameras: one hub each, built from the configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from agent.config import CameraConfig, MediaSection
from agent.media.hub import CameraHub
from agent.media.sources import make_source


@dataclass(frozen=True)
class Camera:
    config: CameraConfig
    hub: CameraHub

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name or self.config.id


class Cameras:
    def __init__(self, configs: list[CameraConfig], media: MediaSection) -> None:
        self._cameras: dict[str, Camera] = {}
        for config in configs:
            hub = CameraHub(
                config.id,
                lambda c=config: make_source(c, media.camera_timeout),  # type: ignore[misc]
                idle_grace=media.idle_grace, always_on=config.always_on,
                gop_cache=media.gop_cache, queue_packets=media.queue_packets,
                reconnect_max=media.reconnect_max,
            )
            self._cameras[config.id] = Camera(config, hub)

    def get(self, camera_id: str) -> Camera | None:
        return self._cameras.get(camera_id)

    def __iter__(self) -> Iterator[Camera]:
        return iter(self._cameras.values())

    def start(self) -> None:
        """Start the always-on cameras (on the event loop)."""
        for camera in self._cameras.values():
            if camera.config.always_on:
                camera.hub.start()

    async def close(self) -> None:
        await asyncio.gather(*(c.hub.close() for c in self._cameras.values()))
