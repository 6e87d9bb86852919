"""Parts, segments and the LL-HLS media playlist of one camera (sans-I/O: no clock of its
own, no event loop; the muxer feeds it access units and the wall-clock time).

Segments start at keyframes, once the running segment reached ``segment_target`` seconds (a
camera whose GOP is longer gets segments of its GOP). Parts (RFC 8216bis 4.4.4.9) are closed
as soon as one more frame would make them longer than ``part_target``, and at the end of a
segment; a part that starts with a keyframe is INDEPENDENT. A frame's duration is known when
the next one arrives, so a part is published one frame after its last frame arrived. A
segment's bytes are its parts' fragments, joined once; parts are kept only for the segments
the playlist lists with parts. Every byte string served is built once and shared by every viewer.
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
    program_date: float  # epoch seconds of its first frame
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
        self._pending: tuple[bytes, int, bool] | None = None  # sample data, dts, keyframe
        self._samples: list[fmp4.Sample] = []
        self._part_start = 0
        self._part_ticks = 0
        self._last_duration = TICKS // 30
        self.longest_part = 0.0

    # -- feeding ------------------------------------------------------------------------------

    def push(self, sample: bytes, dts: int, keyframe: bool, now: float) -> bool:
        """One access unit (length-prefixed), its decode time (90 kHz, increasing) and
        whether it is a keyframe. The first call must bring a keyframe. True when a part
        (and perhaps a segment) was published."""
        published = False
        pending = self._pending
        if pending is not None:
            data, start, key = pending
            duration = dts - start if dts > start else self._last_duration
            self._last_duration = duration
            if self._samples and self._part_ticks + duration > self.part_target * TICKS:
                published |= self._close_part()
            if not self._samples:
                self._part_start = start
            self._samples.append(fmp4.Sample(data, duration, key))
            self._part_ticks += duration
            current = self.current
            if keyframe and current is not None and (
                    current.duration + self._part_ticks / TICKS >= 0.9 * self.segment_target):
                published |= self._close_part()
                self._close_segment(now)
            elif self._part_ticks + duration > self.part_target * TICKS:
                published |= self._close_part()
        if self.current is None:
            self.current = Segment(0, dts, now)
        self._pending = (sample, dts, keyframe)
        return published

    def _close_part(self) -> bool:
        if not self._samples or self.current is None:
            return False
        self._sequence += 1
        data = fmp4.fragment(self._sequence, self._part_start, self._samples)
        duration = self._part_ticks / TICKS
        self.current.parts.append(Part(data, duration, self._samples[0].keyframe))
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
        self.complete.append(done)
        self._bytes += done.size
        # its date: when its keyframe reached the agent (EXT-X-PROGRAM-DATE-TIME)
        self.current = Segment(done.msn + 1, done.start + round(done.duration * TICKS), now)
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
