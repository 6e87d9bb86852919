"""Parts, segments and the LL-HLS media playlist of one camera (sans-I/O: no clock of its
own, no event loop; the muxer feeds it access units and the wall-clock time).

Segments start at keyframes, once the running segment reached ``segment_target`` seconds (a
camera whose GOP is longer gets segments of its GOP). Parts (RFC 8216bis 4.4.4.9) are closed
as soon as one more frame would make them longer than ``part_target``, and at the end of a
segment; a part that starts with a keyframe is INDEPENDENT. A frame's duration is known when
the next one arrives; the last frame of a part goes out when it arrives, with the usual frame
duration, and the next frame's duration makes up any difference, so parts are published
without waiting a frame and decode times follow the camera's. A segment's bytes are its
parts' fragments, joined once; parts are kept only for the segments the playlist lists with
parts. Every byte string served is built once and shared by every viewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.hls import fmp4

TICKS = fmp4.VIDEO_TIMESCALE
#: Segments listed with their parts: the running one and the last complete ones (RFC
#: 8216bis 6.2.2: parts older than three target durations may go).
PART_SEGMENTS = 2
#: _HLS_part may ask this many parts ahead of the last one (RFC 8216bis 6.2.5.2).
ADVANCE_PART_LIMIT = 3
#: No segment has this many parts (an hour at the smallest part duration).
MAX_PART_INDEX = 20_000


@dataclass
class Part:
    data: bytes
    duration: float  # seconds
    independent: bool


@dataclass
class Segment:
    msn: int
    start: int  # 90 kHz
    program_date: float  # epoch seconds of its first frame (final once complete)
    parts: list[Part] = field(default_factory=list)
    duration: float = 0.0
    data: bytes | None = None  # set once complete
    size: int = 0


class Segmenter:
    def __init__(self, part_target: float, segment_target: float, max_segments: int,
                 max_bytes: int) -> None:
        self.part_target = part_target
        self.segment_target = segment_target
        self._max_segments = max_segments
        self._max_bytes = max_bytes
        self.complete: list[Segment] = []  # oldest first; bytes bounded
        self.current: Segment | None = None
        self._bytes = 0
        self._sequence = 0  # moof sequence numbers
        #: The frame waiting for its duration: data, dts, keyframe, and the duration it went
        #: out with if it is already in a part (the last frame of a part goes out at once).
        self._pending: tuple[bytes, int, bool, int | None] | None = None
        self._out = 0  # the output clock: decode time of the next frame appended (90 kHz)
        self._debt = 0  # ticks the output clock owes the camera's (estimates made early)
        self._samples: list[fmp4.Sample] = []
        self._part_start = 0
        self._part_ticks = 0
        self._last_duration = TICKS // 30
        self.longest_part = 0.0
        self._rendered: bytes | None = None  # the playlist as of the last publication

    # -- feeding ------------------------------------------------------------------------------

    def push(self, sample: bytes, dts: int, keyframe: bool, now: float) -> bool:
        """One access unit (length-prefixed), its decode time (90 kHz, increasing) and
        whether it is a keyframe. The first call must bring a keyframe. True when a part
        (and perhaps a segment) was published."""
        published = False
        target = self.part_target * TICKS
        pending = self._pending
        if pending is None:
            self._out = dts
        else:
            data, start, key, early = pending
            real = dts - start if dts > start else self._last_duration
            self._last_duration = real
            if early is not None:  # it went out with the usual duration: settle the difference
                self._debt += real - early
            else:
                duration = self._settle(real)
                if self._samples and self._part_ticks + duration > target:
                    published |= self._close_part()
                self._append(data, duration, key)
            current = self.current
            if keyframe and current is not None and (
                    current.duration + self._part_ticks / TICKS >= 0.9 * self.segment_target):
                published |= self._close_part()
                self._close_segment(now)
            elif self._part_ticks + real > target:
                published |= self._close_part()
        if self.current is None:
            self.current = Segment(0, dts, now)
            self._rendered = None
        # The last frame that fits in the part goes out now, with the usual frame duration
        # (corrected on the next frame), rather than one frame later.
        usual = self._last_duration
        early_duration: int | None = None
        if (not self._samples or self._part_ticks + usual <= target) and (
                self._part_ticks + 2 * usual > target):
            self._append(sample, self._settle(usual), keyframe)
            early_duration = usual
            published |= self._close_part()
        self._pending = (sample, dts, keyframe, early_duration)
        return published

    def _settle(self, real: int) -> int:
        """A frame's duration on the output clock: its own, plus what earlier estimates owe."""
        duration = max(1, real + self._debt)
        self._debt += real - duration
        return duration

    def _append(self, data: bytes, duration: int, keyframe: bool) -> None:
        if not self._samples:
            self._part_start = self._out
        self._samples.append(fmp4.Sample(data, duration, keyframe))
        self._part_ticks += duration
        self._out += duration

    def _close_part(self) -> bool:
        if not self._samples or self.current is None:
            return False
        self._sequence += 1
        data = fmp4.fragment(self._sequence, self._part_start, self._samples)
        duration = self._part_ticks / TICKS
        self.current.parts.append(Part(data, duration, self._samples[0].keyframe))
        self._rendered = None
        self.current.duration += duration
        self.current.size += len(data)
        self.longest_part = max(self.longest_part, duration)
        self._samples = []
        self._part_ticks = 0
        return True

    def _close_segment(self, now: float) -> None:
        done = self.current
        assert done is not None
        done.data = b"".join(p.data for p in done.parts)
        # Its date (EXT-X-PROGRAM-DATE-TIME), fixed before any playlist lists it: when its
        # first frame reached the agent, taken as now minus its duration (a first segment
        # replayed fast from the GOP cache is dated back right), and continuous with the
        # previous one (players such as GStreamer's check that), unless the camera's clock
        # and ours parted by a second (a reconnect).
        first_frame = now - done.duration
        if self.complete:
            previous = self.complete[-1]
            follows = previous.program_date + previous.duration
            done.program_date = follows if abs(follows - first_frame) < 1.0 else first_frame
        else:
            done.program_date = first_frame
        self.complete.append(done)
        self._bytes += done.size
        self.current = Segment(done.msn + 1, done.start + round(done.duration * TICKS), now)
        self._rendered = None
        while len(self.complete) > self._max_segments or (
                self._bytes > self._max_bytes and len(self.complete) > 1):
            self._bytes -= self.complete.pop(0).size
        listed = PART_SEGMENTS - 1  # complete segments the playlist lists with parts
        for old in self.complete[:-listed] if listed else self.complete:
            if old.parts and old.parts[0].data:  # their bytes live on in old.data
                old.parts = [Part(b"", p.duration, p.independent) for p in old.parts]

    # -- reading ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """At least one complete segment: a playlist can be served."""
        return bool(self.complete)

    @property
    def next_msn(self) -> int:
        return self.current.msn if self.current is not None else 0

    def has(self, msn: int, part: int | None) -> bool:
        """Is segment ``msn`` complete (``part`` None), or its part ``part`` published?
        A part beyond a complete segment's last is the next segment's first (8216bis)."""
        current = self.current
        if current is None:
            return False
        if part is None:
            return msn < current.msn
        if msn < current.msn:
            segment = self.segment(msn)
            if segment is None or part < len(segment.parts):
                return True
            return self.has(msn + 1, 0)
        return msn == current.msn and part < len(current.parts)

    def too_far(self, msn: int, part: int | None) -> bool:
        """A request for what cannot come soon (RFC 8216bis 6.2.5.2: 400 Bad Request):
        a segment more than two after the last complete one, a part more than
        ADVANCE_PART_LIMIT after the last published one."""
        current = self.next_msn
        if msn > current + 1:  # the last complete segment is current - 1
            return True
        if part is None:
            return False
        if part > MAX_PART_INDEX:
            return True
        if msn == current:
            published = len(self.current.parts) if self.current is not None else 0
            return part >= published + ADVANCE_PART_LIMIT
        return msn == current + 1 and part >= ADVANCE_PART_LIMIT

    def segment(self, msn: int) -> Segment | None:
        for segment in self.complete:
            if segment.msn == msn:
                return segment
        return None

    def part(self, msn: int, index: int) -> bytes | None:
        segment = self.current if self.current is not None and self.current.msn == msn \
            else self.segment(msn)
        if segment is None or not 0 <= index < len(segment.parts):
            return None
        return segment.parts[index].data or None

    def target_duration(self) -> int:
        longest = max((s.duration for s in self.complete), default=0.0)
        return max(1, round(self.segment_target), math.ceil(longest - 0.001))

    def advertised_part_target(self) -> float:
        return max(self.part_target, self.longest_part)

    def playlist_bytes(self) -> bytes:
        """``playlist()`` encoded, made once per publication for every viewer."""
        if self._rendered is None:
            self._rendered = self.playlist().encode()
        return self._rendered

    def playlist(self) -> str:
        """The LL-HLS media playlist (RFC 8216bis) as it stands now."""
        part_target = self.advertised_part_target()
        lines = ["#EXTM3U", "#EXT-X-VERSION:9",
                 f"#EXT-X-TARGETDURATION:{self.target_duration()}",
                 "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,"
                 f"PART-HOLD-BACK={3 * part_target:.3f}",
                 f"#EXT-X-PART-INF:PART-TARGET={part_target:.3f}",
                 f"#EXT-X-MEDIA-SEQUENCE:{self.complete[0].msn if self.complete else 0}",
                 '#EXT-X-MAP:URI="init.mp4"']
        with_parts = {s.msn for s in self.complete[-(PART_SEGMENTS - 1):]} if \
            PART_SEGMENTS > 1 else set()
        for segment in self.complete:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(segment.program_date)}")
            if segment.msn in with_parts:
                lines += _parts(segment)
            lines += [f"#EXTINF:{segment.duration:.5f},", f"seg{segment.msn}.m4s"]
        current = self.current
        if current is not None:
            if not self.complete:
                lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(current.program_date)}")
            lines += _parts(current)
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part{current.msn}.'
                         f'{len(current.parts)}.m4s"')
        return "\n".join(lines) + "\n"


def _parts(segment: Segment) -> list[str]:
    return [f'#EXT-X-PART:DURATION={p.duration:.5f},URI="part{segment.msn}.{i}.m4s"'
            + (",INDEPENDENT=YES" if p.independent else "")
            for i, p in enumerate(segment.parts)]


def _date(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
