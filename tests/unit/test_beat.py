"""Periodic work on a shared beat (agent/beat.py)."""

from __future__ import annotations

import asyncio

import pytest

from agent.beat import next_beat, until_beat


@pytest.mark.parametrize(("now", "interval", "beat"), [
    (12.3, 0.25, 12.5), (12.5, 0.25, 12.75), (12.0, 1.0, 13.0), (12.85, 1.0, 13.0),
    (12.95, 1.0, 14.0),  # less than a tenth of the interval away: the one after
    (12.4999999, 0.5, 13.0),  # a timer run a hair before its beat does not run again at once
    (3.0, 5.0, 5.0), (4.7, 5.0, 10.0),
])
def test_the_next_beat_is_a_multiple_of_the_interval_not_too_close(
        now: float, interval: float, beat: float) -> None:
    assert next_beat(now, interval) == pytest.approx(beat)


async def test_work_of_commensurate_intervals_wakes_together() -> None:
    """Three loops (0.25, 0.5 and 1 s) started at odd times: each 1 s run happens at the
    same moment as a 0.5 s and a 0.25 s run, so three loops cost four wake-ups a second."""
    loop = asyncio.get_running_loop()
    runs: dict[float, list[float]] = {0.25: [], 0.5: [], 1.0: []}

    async def every(interval: float, delay: float) -> None:
        await asyncio.sleep(delay)
        while True:
            await asyncio.sleep(until_beat(interval))
            runs[interval].append(loop.time())

    tasks = [asyncio.create_task(every(i, d)) for i, d in ((0.25, 0.03), (0.5, 0.11), (1.0, 0.07))]
    await asyncio.sleep(2.5)
    for task in tasks:
        task.cancel()
    assert len(runs[1.0]) >= 2
    for seconds in runs[1.0]:
        for interval in (0.25, 0.5):
            assert min(abs(seconds - t) for t in runs[interval]) < 0.02, runs
    assert len(runs[0.25]) <= 2.5 / 0.25 + 1
