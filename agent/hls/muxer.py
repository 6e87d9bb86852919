"""One camera's HLS muxer: a hub consumer turned into fMP4 parts and segments, once for every
HLS viewer of the camera.

It starts when the first HLS session of the camera asks for something and stops when the
camera has no HLS session left (the hub then keeps pulling for ``media.idle_grace``, as for
any consumer that leaves). Like other consumers it starts from the hub's cached GOP, which the
hub replays faster than real time; the muxer keeps the camera's own frame durations (from its
timestamps), so the first segment plays at normal speed.

Waiting for a part (blocking playlist reload, a preload hint) costs one future on a shared
event, renewed at every publication; no task per waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from agent.hls import fmp4
from agent.hls.segmenter import TICKS, Segmenter
from agent.media.consumer import Consumer, ConsumerClosed
from agent.media.hub import CameraHub
from agent.media.stream import StreamInfo

log = structlog.get_logger(__name__)

#: A gap between two frames' timestamps beyond this (a camera reconnect, a clock jump) is
#: taken as one frame of the usual duration.
MAX_FRAME_GAP = 5 * TICKS


class HlsMuxer:
    def __init__(self, hub: CameraHub, *, part_target: float, segment_target: float,
                 max_segments: int, max_bytes: int) -> None:
        self.hub = hub
        self.camera_id = hub.camera_id
        self.segmenter = Segmenter(part_target, segment_target, max_segments, max_bytes)
        self.track: fmp4.VideoTrack | None = None
        self.init: bytes | None = None
        self.error: str | None = None  # why the camera's video cannot be muxed
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._last_src: int | None = None
        self._dts = 0
        self._delta = TICKS // 30
        self.stopped = False
        #: The camera came back with other parameter sets or size: this muxer has ended.
        self.stream_changed = False
        self._info: StreamInfo | None = None  # what the track was made from

    def start(self) -> None:
        self._consumer = self.hub.subscribe(video=True)
        self._task = asyncio.get_running_loop().create_task(
            self._run(self._consumer), name=f"hls-{self.camera_id}")

    async def stop(self) -> None:
        self.stopped = True
        if self._consumer is not None:
            self.hub.unsubscribe(self._consumer)
            self._consumer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` is true (checked at each publication), at most
        ``timeout`` seconds; False on timeout or when the muxer stopped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.stopped or self.error is not None:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return bool(predicate())
        return True

    async def _run(self, consumer: Consumer) -> None:
        try:
            while True:
                packet, _ = await consumer.next()
                tb = packet.time_base
                src = packet.pts * tb.numerator * TICKS // tb.denominator
                self._advance(src)
                track = self.track
                if track is None and (not packet.keyframe or (
                        track := self._start_track(packet.data)) is None):
                    continue
                if packet.keyframe and self.hub.info is not self._info and self._stream_differs(
                        track, packet.data):
                    return
                sample = fmp4.length_prefixed(track.codec, packet.data)
                if self.segmenter.push(sample, self._dts, packet.keyframe, time.time()):
                    self._published()
        except ConsumerClosed:
            return
        finally:
            self.stopped = True
            if self._consumer is not None:  # ended on its own (stream changed): let go
                self.hub.unsubscribe(self._consumer)
                self._consumer = None
            self._notify()

    def _advance(self, src: int) -> None:
        """The muxer's own decode timeline: the camera's frame durations, always increasing."""
        last = self._last_src
        self._last_src = src
        if last is None:
            return
        delta = src - last
        if 0 < delta <= MAX_FRAME_GAP:
            self._delta = delta
        self._dts += self._delta

    def _stream_differs(self, track: fmp4.VideoTrack, keyframe: bytes) -> bool:
        """The camera came back (a new StreamInfo): is its video still what the init segment
        describes? If not, the muxer ends (its sessions with it: players open index.m3u8
        again and get the new init segment)."""
        info = self._info = self.hub.info
        if info is None:
            return False
        try:
            now = fmp4.video_track(info.codec, info.width, info.height, keyframe,
                                   info.parameter_sets)
        except fmp4.Fmp4Error:
            now = None
        if now is not None and now.parameter_sets == track.parameter_sets and (
                now.width, now.height) == (track.width, track.height):
            return False
        log.info("hls_stream_changed", camera=self.camera_id, was=track.codec_string,
                 now=now.codec_string if now else None,
                 size=f"{info.width}x{info.height}")
        self.stream_changed = True
        return True

    def _start_track(self, keyframe: bytes) -> fmp4.VideoTrack | None:
        info = self._info = self.hub.info
        if info is None:
            return None
        try:
            self.track = fmp4.video_track(info.codec, info.width, info.height, keyframe,
                                          info.parameter_sets)
        except fmp4.Fmp4Error as exc:
            if self.error != str(exc):
                log.warning("hls_unsupported_stream", camera=self.camera_id, error=str(exc))
            self.error = str(exc)
            self._notify()
            return None
        self.error = None
        self.init = fmp4.init_segment(self.track)
        log.info("hls_muxer_started", camera=self.camera_id, codec=self.track.codec_string)
        self._notify()
        return self.track

    def _published(self) -> None:
        self._notify()
