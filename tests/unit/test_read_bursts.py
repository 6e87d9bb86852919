"""The wake-ups that watched cameras cost the event loop, as the hub counts them to decide
whether they share one read timer (agent/media/hub.py, ``_Reads.burst``)."""

from __future__ import annotations

import asyncio
import socket
import time

from agent.media.hub import _Reads


async def test_cameras_readable_in_one_wake_up_count_once_and_each_wake_up_counts() -> None:
    loop = asyncio.get_running_loop()
    reads = _Reads(loop)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for ours, _ in pairs:
            ours.setblocking(False)

            def readable(sock: socket.socket = ours) -> None:
                sock.recv(100)
                reads.burst()

            loop.add_reader(ours, readable)
        for _, camera in pairs:
            camera.send(b"frame")
        await asyncio.sleep(0.05)
        assert reads._bursts == 1  # three cameras, one wake-up
        for _, camera in pairs:  # one after another: the loop sleeps in between
            camera.send(b"frame")
            await asyncio.sleep(0.02)
        assert reads._bursts == 4
    finally:
        for ours, camera in pairs:
            loop.remove_reader(ours)
            ours.close()
            camera.close()


def test_a_wake_up_a_fraction_of_a_millisecond_after_the_last_counts_too() -> None:
    """A camera writes a frame's packets apart (a delimiter, then each slice), 0.3 ms or so:
    the loop may wake for each, and each such wake-up is one the shared timer would save."""
    loop = asyncio.new_event_loop()
    try:
        reads = _Reads(loop)
        for _ in range(5):
            reads.burst()
            time.sleep(0.0002)  # the loop's thread sleeps: what comes next wakes it again
        assert reads._bursts == 5
    finally:
        loop.close()
