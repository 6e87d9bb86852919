"""One viewer's (or one relay session's) view of a camera: a bounded queue with a timeline.

The hub offers every packet; a consumer keeps at most ``maxsize`` of them. One that falls
behind drops its queue and waits for the next keyframe, so memory never grows. A new video
consumer starts with the hub's cached GOP, replayed ``REPLAY_SPEED`` times faster than real
time with its timestamps compressed to match, so the picture appears at once and catches up
with live within a fraction of the GOP. Timestamps stay monotonic across camera reconnects.

A consumer whose work per packet never waits (a WebRTC viewer's UDP send, an RTSP client's
write) takes live packets through a *sink*, called at once by the hub's read: no queue, no
task switch and no extra turn of the event loop per viewer and frame (docs/field-notes.md,
"What a watched frame costs"). ``next()`` still serves the replayed GOP and whatever is
queued when the sink is not called.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from fractions import Fraction

from agent.media.stream import MediaPacket

REPLAY_SPEED = 4
VIDEO_CLOCK = 90_000


class ConsumerClosed(Exception):
    """The consumer was closed (viewer gone, session ended, agent stopping)."""


class Consumer:
    def __init__(
        self, video: bool, maxsize: int, replay: list[tuple[int, MediaPacket]], epoch: int,
        clock: int,
    ) -> None:
        self.video = video
        self.clock = clock
        self.time_base = Fraction(1, clock)  # of the timestamps next() returns
        self._maxsize = maxsize
        self._queue: deque[tuple[int, MediaPacket]] = deque()
        self._replay: deque[tuple[int, MediaPacket]] = deque(replay)
        self._wake = asyncio.Event()
        self._closed = False
        self._need_keyframe = video and not replay
        self._epoch = epoch if replay else -1
        self._shift: int | None = None  # subtracted from source ticks (output clock)
        self._last_out: int | None = None
        self._last_src: int | None = None
        self._replay_base: int | None = None
        self._replays = 0  # replay() calls: a paced replay restarts when it changes
        self.dropped = 0
        self._sink: Callable[[MediaPacket, int], None] | None = None

    def deliver_to(self, sink: Callable[[MediaPacket, int], None] | None) -> None:
        """Hand live packets, with their timestamps, to ``sink`` as they are offered, on the
        loop, instead of queueing them for :meth:`next` (``None``: queue them again). While a
        replay runs or packets are queued they are queued too, so the order never changes.
        ``sink`` must not raise: it runs inside the camera's read."""
        self._sink = sink

    def offer(self, epoch: int, packet: MediaPacket) -> None:
        """Called by the hub on the event loop for every packet of this kind."""
        if self._closed:
            return
        if self._need_keyframe and not packet.keyframe:
            self.dropped += 1
            return
        if self._sink is not None and not self._queue and not self._replay:
            self._need_keyframe = False
            self._sink(packet, self._live_ticks(epoch, packet))
            return
        if len(self._queue) >= self._maxsize:
            self.dropped += len(self._queue) + 1
            self._queue.clear()
            self._need_keyframe = self.video
            if self.video and not packet.keyframe:
                return
        self._need_keyframe = False
        self._queue.append((epoch, packet))
        self._wake.set()

    def replay(self, gop: list[tuple[int, MediaPacket]]) -> None:
        """Start again from ``gop``'s keyframe (a viewer lost the picture: PLI/FIR), replayed
        fast like a new consumer's start; the timeline continues where it was."""
        if self._closed or not gop:
            return
        self._queue.clear()  # the GOP holds every packet up to now
        self._replay = deque(gop)
        self._replays += 1
        self._replay_base = None
        self._need_keyframe = False
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._replay.clear()
        self._wake.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def next(self) -> tuple[MediaPacket, int]:
        """The next packet and its timestamp on this consumer's timeline (1/clock)."""
        if self._replay:
            return await self._next_replayed()
        while not self._queue:
            if self._closed:
                raise ConsumerClosed
            self._wake.clear()
            await self._wake.wait()
            if self._replay:  # replay() while we waited
                return await self._next_replayed()
        if self._closed:
            raise ConsumerClosed
        epoch, packet = self._queue.popleft()
        return packet, self._live_ticks(epoch, packet)

    def _live_ticks(self, epoch: int, packet: MediaPacket) -> int:
        ticks = self._ticks(packet)
        if epoch != self._epoch or self._shift is None:
            self._epoch = epoch
            self._rebase(ticks)
        return self._emit(ticks)

    async def _next_replayed(self) -> tuple[MediaPacket, int]:
        # Taken off the replay only once sent on: until then live packets queue behind it.
        epoch, packet = self._replay[0]
        ticks = self._ticks(packet)
        if self._replay_base is None:
            self._replay_base = ticks
            self._rebase(ticks)
        else:
            assert self._last_src is not None
            gap = max(0, ticks - self._last_src) / REPLAY_SPEED
            replays = self._replays
            await asyncio.sleep(gap / self.clock)  # paced: a fast-forward, not one burst
            if self._closed:
                raise ConsumerClosed
            if replays != self._replays:  # replay() while we waited: from its keyframe
                return await self.next()
            # Compress: this packet comes gap ticks after the previous one, not its real gap.
            assert self._last_out is not None and self._shift is not None
            self._shift = ticks - (self._last_out + max(1, int(gap)))
        self._replay.popleft()
        self._epoch = epoch
        return packet, self._emit(ticks)

    def _ticks(self, packet: MediaPacket) -> int:
        tb = packet.time_base  # integer arithmetic: Fraction operators cost microseconds
        return packet.pts * tb.numerator * self.clock // tb.denominator

    def _rebase(self, ticks: int) -> None:
        """Continue the output timeline from the last packet (one frame later)."""
        gap = self.clock // 30 if self.video else 0
        follow = self._last_out + max(1, gap) if self._last_out is not None else ticks
        self._shift = ticks - follow

    def _emit(self, ticks: int) -> int:
        assert self._shift is not None
        out = ticks - self._shift
        if self._last_out is not None and out <= self._last_out:
            out = self._last_out + 1  # never backwards, whatever the camera does
        self._last_out, self._last_src = out, ticks
        return out


