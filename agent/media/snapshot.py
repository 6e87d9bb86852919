"""JPEG snapshots from a camera's cached keyframe, decoded in a thread.

A JPEG is kept ``cache_seconds`` and shared by every request for the same keyframe, so a
burst of requests costs one decode; requests that arrive while a decode runs wait for it.
"""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from typing import Any

from agent.errors import SourceError
from agent.media.hub import CameraHub
from agent.media.stream import MediaPacket


def encode_jpeg(packet: MediaPacket, codec: str = "h264", quality: int = 5) -> bytes:
    """Decode one keyframe (H.264 or H.265) and encode it as JPEG. Blocking: in a thread.
    A keyframe FFmpeg cannot decode (a camera streaming junk) is a ``SourceError``."""
    import av  # noqa: PLC0415 (PyAV loads with the first pull, not at start)

    decoder: Any = av.CodecContext.create(codec, "r")  # a video context: codec is h264/hevc
    try:
        frames = list(decoder.decode(av.Packet(packet.data)))
        frames += list(decoder.decode(None))
    except (av.FFmpegError, ValueError) as exc:
        raise SourceError(f"the camera's keyframe cannot be decoded ({exc})") from None
    if not frames:
        raise SourceError("the keyframe could not be decoded")
    frame = frames[0].reformat(format="yuvj420p")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = frame.width, frame.height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = {"q:v": str(quality)}
    encoder.qmin = encoder.qmax = quality
    encoder.open()
    out = b"".join(bytes(p) for p in encoder.encode(frame))
    out += b"".join(bytes(p) for p in encoder.encode(None))
    return out


class Snapshotter:
    def __init__(self, cache_seconds: float, keyframe_timeout: float) -> None:
        self._ttl = cache_seconds
        self._timeout = keyframe_timeout
        self._cache: dict[str, tuple[float, MediaPacket, bytes]] = {}
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self.decodes = 0

    async def jpeg(self, hub: CameraHub) -> bytes | None:
        """The camera's current picture as JPEG, or None if no keyframe arrived in time."""
        cached = self._cache.get(hub.camera_id)
        if cached and time.monotonic() - cached[0] < self._ttl:
            return cached[2]
        running = self._inflight.get(hub.camera_id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[hub.camera_id] = future
        try:
            found = await hub.keyframe(self._timeout)
            if found is None:
                future.cancel()
                return None
            packet, info = found
            if cached and cached[1] is packet:
                data = cached[2]  # same keyframe as last time: no decode
            else:
                self.decodes += 1
                data = await asyncio.to_thread(encode_jpeg, packet, info.codec)
            self._cache[hub.camera_id] = (time.monotonic(), packet, data)
            future.set_result(data)
            return data
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters get it, nobody logs it twice
            raise
        finally:
            del self._inflight[hub.camera_id]
