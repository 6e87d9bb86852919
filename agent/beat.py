"""Periodic work on a shared beat, so that it costs one wake-up of the process, not one each.

A wake-up of the event loop costs far more CPU than most periodic work does (measured on a
virtual machine: 50–140 µs for an empty timer; docs/field-notes.md). So work that repeats
every ``interval`` waits until the next multiple of ``interval`` on the loop's clock, not
``interval`` from whenever it last ran: every such task whose interval divides the others'
(0.25, 0.5, 1 and 5 s) then runs in the same wake-up, however many there are (one sender
report loop per viewer, housekeeping, the loop-lag probe, the token sweep).
"""

from __future__ import annotations

import asyncio


def next_beat(now: float, interval: float) -> float:
    """The first multiple of ``interval`` after ``now`` (on the same clock), at least a
    tenth of ``interval`` away, so that work run on a beat never runs twice in a row."""
    beat = now - now % interval + interval
    return beat if beat - now >= interval / 10 else beat + interval


def until_beat(interval: float) -> float:
    """Seconds to sleep until the next beat of ``interval`` on the running loop's clock."""
    now = asyncio.get_running_loop().time()
    return next_beat(now, interval) - now
