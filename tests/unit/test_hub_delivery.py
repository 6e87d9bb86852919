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


class Reader:
    """What a WebRTC viewer or RTSP client does: live packets through the sink, the replayed
    GOP and anything queued through next(), from its task."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.got: list[tuple[int, int, str]] = []  # (pts, timestamp, by which path)
        consumer.deliver_to(self.live)
        self.task = asyncio.create_task(self.run())

    def live(self, p: MediaPacket, ticks: int) -> None:
        self.got.append((p.pts, ticks, "sink"))

    async def run(self) -> None:
        while True:
            p, ticks = await self.consumer.next()
            self.got.append((p.pts, ticks, "task"))


async def test_live_packets_reach_the_sink_after_the_replayed_gop_never_before() -> None:
    gop = [(1, packet(n, keyframe=n == 0)) for n in range(5)]
    reader = Reader(Consumer(True, maxsize=100, replay=gop, epoch=1, clock=90_000))
    for n in range(5, 30):  # live frames arrive while the GOP is still being replayed
        reader.consumer.offer(1, packet(n))
        await asyncio.sleep(FRAME / 90_000 / 3)  # three times the camera's rate
    await asyncio.sleep(0.1)
    reader.task.cancel()
    assert [pts for pts, _, _ in reader.got] == [n * FRAME for n in range(30)], \
        "every frame once, in the camera's order"
    stamps = [s for _, s, _ in reader.got]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    paths = [by for _, _, by in reader.got]
    assert paths[:6] == ["task"] * 6, "the replay and what was queued meanwhile: the task"
    assert paths[-1] == "sink", "then live, straight from the camera's read"
    assert paths == sorted(paths, reverse=True), "no packet back through the task after that"


async def test_a_live_packet_waits_for_the_last_replayed_one_held_for_pacing() -> None:
    """The replay is paced: its last packet waits (here 83 ms) before it is handed on. A live
    packet offered meanwhile must not overtake it through the sink."""
    gop = [(1, packet(n * 10, keyframe=n == 0)) for n in range(3)]  # 10 frames apart
    reader = Reader(Consumer(True, maxsize=100, replay=gop, epoch=1, clock=90_000))
    await asyncio.sleep(0.125)  # the task holds the last one: sent at 83 ms, due at 167
    reader.consumer.offer(1, packet(21))
    await asyncio.sleep(0.1)
    reader.task.cancel()
    assert [pts // FRAME for pts, _, _ in reader.got] == [0, 10, 20, 21]


async def test_a_replay_asked_for_while_live_goes_through_the_task_then_live_again() -> None:
    gop = [(1, packet(n, keyframe=n == 0)) for n in range(3)]
    reader = Reader(Consumer(True, maxsize=100, replay=[], epoch=1, clock=90_000))
    await asyncio.sleep(0)
    for _, p in gop:
        reader.consumer.offer(1, p)
    assert [by for *_, by in reader.got] == ["sink"] * 3
    reader.consumer.replay(gop)  # a PLI
    reader.consumer.offer(1, packet(3))  # queued behind the replay
    await asyncio.sleep(0.05)
    reader.consumer.offer(1, packet(4))
    reader.task.cancel()
    assert [(pts // FRAME, by) for pts, _, by in reader.got] == [
        (0, "sink"), (1, "sink"), (2, "sink"), (0, "task"), (1, "task"), (2, "task"),
        (3, "task"), (4, "sink")]
    stamps = [s for _, s, _ in reader.got]
    assert all(b > a for a, b in itertools.pairwise(stamps)), "one timeline throughout"


async def test_a_sink_may_end_its_own_consumer_during_the_hub_s_delivery() -> None:
    hub = idle_hub()
    hub._epoch = 1
    consumers = [Consumer(True, maxsize=100, replay=[], epoch=1, clock=90_000)
                 for _ in range(3)]
    got: list[int] = []
    for c in consumers:
        hub._consumers.add(c)

        def sink(p: MediaPacket, ticks: int, c: Consumer = c) -> None:
            got.append(p.pts)
            hub.unsubscribe(c)  # as a viewer whose send failed does

        c.deliver_to(sink)
    hub._deliver(1, packet(0, keyframe=True))
    assert got == [0, 0, 0] and not hub._consumers
