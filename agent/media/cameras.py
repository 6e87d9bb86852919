"""The agent's cameras: one hub each, built from the configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
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
        self._media = media
        self._cameras: dict[str, Camera] = {c.id: self._build(c) for c in configs}

    def _build(self, config: CameraConfig) -> Camera:
        media = self._media
        hub = CameraHub(
            config.id,
            lambda c=config: make_source(c, media.camera_timeout),  # type: ignore[misc]
            idle_grace=media.idle_grace, always_on=config.always_on,
            gop_cache=media.gop_cache, queue_packets=media.queue_packets,
            reconnect_max=media.reconnect_max, camera_timeout=media.camera_timeout,
        )
        return Camera(config, hub)

    async def apply(self, configs: list[CameraConfig],
                    ending: Callable[[str, str], Awaitable[None]] | None = None,
                    ) -> tuple[list[str], list[str], list[str]]:
        """Make the camera set match ``configs``: cameras whose entry is unchanged keep their
        hub, pull and viewers. ``ending(camera_id, why)`` ends a removed or changed camera's
        sessions before the camera goes (their ends are recorded before any client can see
        the camera gone). Returns (added, removed, changed) ids."""
        wanted = {c.id: c for c in configs}
        removed = [i for i in self._cameras if i not in wanted]
        changed = [i for i, c in wanted.items() if i in self._cameras
                   and self._cameras[i].config != c]
        added = [i for i in wanted if i not in self._cameras]
        for camera_id in removed + changed:
            if ending is not None:
                await ending(camera_id,
                             "camera_removed" if camera_id in removed else "camera_changed")
            await self._cameras.pop(camera_id).hub.close()
        for camera_id in changed + added:
            self._cameras[camera_id] = self._build(wanted[camera_id])
            if wanted[camera_id].always_on:
                self._cameras[camera_id].hub.start()
        self._cameras = {i: self._cameras[i] for i in wanted}  # the config's order
        return added, removed, changed

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._cameras)

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
