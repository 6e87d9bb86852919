"""How often a camera read on the event loop is checked and read (agent/media/hub.py)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from agent.media.hub import BATCH_INTERVAL, READ_TICK, TICK_ABOVE, CameraHub, _LoopStream, _Reads
from agent.media.stream import MediaPacket


class QuietCamera:
    """A LoopSource whose camera is connected and sends nothing new: counts the calls."""

    def __init__(self) -> None:
        self.sock, self._other = socket.socketpair()
        self.reads = self.checks = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_available(self, drain: bool = False) -> list[MediaPacket]:
        self.reads += 1
        return []

    def silent_for(self) -> float:
        self.checks += 1
        return 0.0

    def close(self) -> None:
        self.sock.close()
        self._other.close()


@pytest.mark.parametrize("live", [True, False])
async def test_on_the_shared_10_ms_timer_a_stream_is_checked_and_read_once_per_beat(
        live: bool) -> None:
    """With many cameras watched, every stream's on_timer runs every 10 ms and may act a
    little before its beat: a watched stream's silence check then comes once a second, an
    unwatched stream's batch read four times a second, not at every tick of that window."""
    loop = asyncio.get_running_loop()
    hub = CameraHub("cam", lambda: None,  # type: ignore[arg-type, return-value]
                    idle_grace=60, always_on=False, gop_cache=True, queue_packets=100,
                    reconnect_max=1)
    camera = QuietCamera()
    stream = _LoopStream(hub, loop, camera, 1, threading.Event(), [])  # type: ignore[arg-type]
    try:
        stream.start(live)
        start, reads, checks = loop.time(), camera.reads, camera.checks
        seconds = 4.0
        for tick in range(int(seconds / READ_TICK)):
            stream.on_timer(start + tick * READ_TICK, ticking=True)
        checked = camera.checks - checks
        if live:
            assert seconds - 1 <= checked <= seconds + 1, checked
        else:
            read = camera.reads - reads
            beats = seconds / BATCH_INTERVAL
            assert beats - 1 <= read <= beats + 1, read
            assert beats - 1 <= checked <= beats + 1, checked
    finally:
        stream.finish()
        camera.close()


async def test_bursts_are_counted_at_each_beat_even_a_hair_short_of_a_second() -> None:
    """The count that decides to share one read timer runs on the 1 s beat: a beat that
    comes a millisecond less than a second after the last count still counts (else the
    switch waited for the beat after, and many watched cameras woke the loop for each
    burst a second longer)."""
    reads = _Reads(asyncio.get_running_loop())
    reads._counted = 100.003  # the last count ran 3 ms after its beat
    reads._bursts = int(TICK_ABOVE * 1.5)
    reads._count(101.001)  # the next beat, run 1 ms after it
    assert reads.ticking
