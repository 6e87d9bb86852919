"""The hub's hand-over from the pull thread (batches, one loop wake-up each) and a
consumer's restart from the cached GOP (the answer to a viewer's PLI/FIR)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from fractions import Fraction

from agent.media.consumer import Consumer
from agent.media.hub import CameraHub
from agent.media.stream import MediaPacket

TB = Fraction(1, 90_000)
FRAME = 3000


def packet(n: int, keyframe: bool = False) -> MediaPacket:
    return MediaPacket(True, b"\x00\x00\x00\x01\x41" + bytes([n % 256]) * 10, n * FRAME, TB,
                       keyframe)


def idle_hub() -> CameraHub:
    def no_source() -> None:
        raise AssertionError("no pull in this test")

    return CameraHub("cam", no_source, idle_grace=1,  # type: ignore[arg-type]
                     always_on=False, gop_cache=True, queue_packets=100, reconnect_max=1)


async def test_packets_from_the_thread_arrive_in_order_with_one_wake_up_per_batch() -> None:
    hub = idle_hub()
    loop = asyncio.get_running_loop()
    consumer = Consumer(True, maxsize=100, replay=[], epoch=1, clock=90_000)
    hub._consumers.add(consumer)  # (subscribe() would start a pull thread)
    hub._epoch = 1
    wakes = 0
    drain = hub._drain

    def counted() -> None:
        nonlocal wakes
        wakes += 1
        drain()

    hub._drain = counted  # type: ignore[method-assign]

    def pull() -> None:  # a burst while the loop is busy, as a demuxer's read-ahead gives
        for n in range(50):
            hub._post(loop, 1, packet(n, keyframe=n == 0))

    thread = threading.Thread(target=pull)
    thread.start()
    thread.join()  # the loop is busy (blocked here) while the thread posts: ~1 ms
    await asyncio.sleep(0.05)
    assert wakes == 1, "one call_soon_threadsafe for the whole burst"
    got = [(await consumer.next())[0].pts for _ in range(50)]
    assert got == [n * FRAME for n in range(50)]
    hub._post(loop, 1, packet(50))
    await asyncio.sleep(0.05)
    assert wakes == 2 and (await consumer.next())[0].pts == 50 * FRAME


async def test_a_replay_restarts_from_the_keyframe_on_a_continuing_timeline() -> None:
    gop = [(1, packet(n, keyframe=n == 0)) for n in range(10)]
    consumer = Consumer(True, maxsize=100, replay=[], epoch=1, clock=90_000)
    for _, p in gop:
        consumer.offer(1, p)
    before = [(await consumer.next())[1] for _ in range(10)]
    waiting = asyncio.create_task(consumer.next())  # a reader already waiting for live
    await asyncio.sleep(0.01)
    consumer.replay(gop)
    first, stamp = await waiting
    assert first.keyframe, "the replay starts with the GOP's keyframe"
    rest = [(await consumer.next()) for _ in range(9)]
    stamps = [stamp, *(s for _, s in rest)]
    assert stamps[0] > before[-1], "the timeline never goes back"
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert [p.pts for p, _ in rest] == [n * FRAME for n in range(1, 10)]
