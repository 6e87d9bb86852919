"""Camera sources. Each is blocking and runs in the hub's pull thread, never on the loop.

``open()`` connects and describes the streams; ``read()`` returns the next packet (pacing
itself in real time where the source is not live); ``close()`` releases everything.

The sources import PyAV (~19 MB of memory), so they are imported by ``make_source``, which
the hub calls in its pull thread: an agent whose cameras nobody watches never loads it.
"""

from __future__ import annotations

from typing import Protocol

from agent.config import CameraConfig, read_secret
from agent.errors import SourceError
from agent.media.stream import MediaPacket, StreamInfo


class Source(Protocol):
    """What the hub needs from a camera source."""

    def open(self) -> StreamInfo: ...

    def read(self) -> MediaPacket: ...

    def close(self) -> None: ...


def make_source(camera: CameraConfig, timeout: float) -> Source:
    """The source for ``cameras[].source``; credentials from the URL, a file or a credential."""
    from agent.media.sources.pyav import file_source, rtsp_source  # noqa: PLC0415 (PyAV)
    from agent.media.sources.testsrc import TestPatternSource  # noqa: PLC0415 (PyAV)

    scheme = camera.source.partition("://")[0].lower()
    if scheme == "testsrc":
        return TestPatternSource(camera.source)
    if scheme == "file":
        return file_source(camera.source, camera.audio)
    password = None
    if camera.username:
        password = read_secret(f"camera-{camera.id}", camera.password_file)
        if password is None:
            raise SourceError(f"camera {camera.id!r} has a username but no password: set "
                              f"password_file, or load the systemd credential camera-{camera.id}")
    return rtsp_source(camera.source, transport=camera.transport, timeout=timeout,
                       username=camera.username, password=password, audio_mode=camera.audio,
                       camera_id=camera.id, rule=camera.rtsp_auth)
