"""Camera sources. Each is blocking and runs in the hub's pull thread, never on the loop.

``open()`` connects and describes the streams; ``read()`` returns the next packet (pacing
itself in real time where the source is not live); ``close()`` releases everything.

``rtsp://`` cameras over TCP are read by the agent's own RTSP client (:mod:`.native`,
PyAV only to transcode AAC); files, the test pattern, UDP transport and ``rtsps://`` by
PyAV (~19 MB of memory). Sources are imported by ``make_source``, which the hub calls in
its pull thread: an agent whose cameras nobody watches loads neither.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from agent.config import CameraConfig, read_secret
from agent.errors import SourceError
from agent.media.stream import MediaPacket, StreamInfo

#: An open (the camera's challenge, the RTSP handshake and the first parameter sets) must
#: finish within this many socket timeouts (media.camera_timeout), whatever the camera sends.
OPEN_DEADLINE = 3


def undelivered(deadline: float) -> str:
    """A camera that answered, but gave no stream the agent can use within ``deadline`` s."""
    return (f"the camera did not deliver a stream within {deadline:g} s of connecting (it "
            "answers, but not with RTSP/H.264 the agent can use): check the URL path and the "
            "camera's stream settings")


class Source(Protocol):
    """What the hub needs from a camera source."""

    def open(self) -> StreamInfo: ...

    def read(self) -> MediaPacket: ...

    def close(self) -> None: ...


@runtime_checkable
class LoopSource(Source, Protocol):
    """A source whose open stream the hub can read on the event loop, without a thread in
    between (the agent's own RTSP client). ``open`` still runs in the pull thread."""

    @property
    def loop_ready(self) -> bool: ...

    def fileno(self) -> int: ...

    def read_available(self, drain: bool = False) -> list[MediaPacket]: ...

    def silent_for(self) -> float: ...


def make_source(camera: CameraConfig, timeout: float) -> Source:
    """The source for ``cameras[].source``; credentials from the URL, a file or a credential."""
    scheme = camera.source.partition("://")[0].lower()
    # PyAV (~16 MB) is imported only for the sources that need it: not for the agent's own
    # RTSP client, so a camera pulled with nobody watching over WebRTC goes without it
    if scheme == "testsrc":
        from agent.media.sources.testsrc import TestPatternSource  # noqa: PLC0415 (PyAV)

        return TestPatternSource(camera.source)
    if scheme == "file":
        from agent.media.sources.pyav import file_source  # noqa: PLC0415 (PyAV)

        return file_source(camera.source, camera.audio)
    password = None
    if camera.username:
        password = read_secret(f"camera-{camera.id}", camera.password_file)
        if password is None:
            raise SourceError(f"camera {camera.id!r} has a username but no password: set "
                              f"password_file, or load the systemd credential camera-{camera.id}")
    if scheme == "rtsp" and camera.transport == "tcp":
        from agent.media.sources.native import native_source  # noqa: PLC0415

        return native_source(camera.source, timeout=timeout, username=camera.username,
                             password=password, audio_mode=camera.audio, camera_id=camera.id,
                             rule=camera.rtsp_auth)
    from agent.media.sources.pyav import rtsp_source  # noqa: PLC0415 (PyAV)

    return rtsp_source(camera.source, transport=camera.transport, timeout=timeout,
                       username=camera.username, password=password, audio_mode=camera.audio,
                       camera_id=camera.id, rule=camera.rtsp_auth)
