"""The camera hub and its consumers: bounded queues, GOP replay, timelines, pulls on demand."""

from __future__ import annotations

import asyncio
import itertools
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from agent.config import CameraConfig
from agent.media.consumer import REPLAY_SPEED, Consumer, ConsumerClosed
from agent.media.hub import CameraHub
from agent.media.sources import make_source
from agent.media.stream import MediaPacket
from tests.support.media import write_clip

TB = Fraction(1, 90_000)
FRAME = 6000  # 15 fps at 90 kHz


def packet(n: int, keyframe: bool = False, base: int = 0) -> MediaPacket:
    return MediaPacket(True, b"\x00\x00\x00\x01" + bytes([n % 256]) * 10, base + n * FRAME, TB,
                       keyframe)


async def test_a_slow_consumer_skips_to_the_next_keyframe_and_never_grows() -> None:
    consumer = Consumer(True, maxsize=10, replay=[], epoch=1, clock=90_000)
    for n in range(1000):
        consumer.offer(1, packet(n, keyframe=n % 30 == 0))
        assert len(consumer._queue) <= 10
    assert consumer.dropped > 900
    first, _ = await consumer.next()
    assert first.keyframe  # after an overflow the viewer restarts at a keyframe


async def test_gop_replay_is_paced_fast_forward_then_live_continues() -> None:
    gop = [(1, packet(n, keyframe=n == 0)) for n in range(16)]
    consumer = Consumer(True, maxsize=100, replay=gop, epoch=1, clock=90_000)
    started = time.monotonic()
    stamps = [(await consumer.next())[1] for _ in range(16)]
    elapsed = time.monotonic() - started
    span = 15 * FRAME / 90_000
    assert span / REPLAY_SPEED * 0.8 <= elapsed < span  # paced, and faster than real time
    assert [b - a for a, b in itertools.pairwise(stamps)] == [FRAME // REPLAY_SPEED] * 15
    consumer.offer(1, packet(16))
    consumer.offer(1, packet(17))
    live = [(await consumer.next())[1] for _ in range(2)]
    assert live[0] - stamps[-1] == FRAME and live[1] - live[0] == FRAME


async def test_timestamps_stay_monotonic_across_a_camera_reconnect() -> None:
    consumer = Consumer(True, maxsize=100, replay=[], epoch=0, clock=90_000)
    for n in range(5):
        consumer.offer(1, packet(n, keyframe=n == 0, base=10_000_000))
    consumer.offer(2, packet(0, keyframe=True))  # the camera came back, its clock at zero
    consumer.offer(2, packet(1))
    stamps = [(await consumer.next())[1] for _ in range(7)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 7
    assert stamps[5] - stamps[4] == 3000 and stamps[6] - stamps[5] == FRAME


async def test_closing_wakes_a_waiting_reader() -> None:
    consumer = Consumer(True, maxsize=10, replay=[], epoch=0, clock=90_000)
    reader = asyncio.create_task(consumer.next())
    await asyncio.sleep(0.05)
    consumer.close()
    with pytest.raises(ConsumerClosed):
        await reader


def hub_for(source: str, **kw: object) -> CameraHub:
    config = CameraConfig(id="cam", source=source)
    settings = {"idle_grace": 0.3, "always_on": False, "gop_cache": True,
                "queue_packets": 100, "reconnect_max": 1.0, **kw}
    return CameraHub("cam", lambda: make_source(config, 2.0), **settings)  # type: ignore[arg-type]


async def test_the_pull_starts_with_the_first_consumer_and_stops_when_idle() -> None:
    hub = hub_for("testsrc://?size=160x120&fps=15&gop=1")
    assert hub.status.state == "idle"
    consumer = hub.subscribe()
    assert await hub.ready(5)
    first, _ = await asyncio.wait_for(consumer.next(), 5)
    assert first.keyframe
    assert (hub.status.width, hub.status.height, hub.status.codec) == (160, 120, "h264")
    second = hub.subscribe()  # a later viewer starts from the cached GOP at once
    replayed, _ = await asyncio.wait_for(second.next(), 1)
    assert replayed.keyframe
    hub.unsubscribe(consumer)
    hub.unsubscribe(second)
    await asyncio.sleep(0.8)
    assert hub.status.state == "idle" and hub.connections == 1
    await hub.close()


async def test_an_unreachable_camera_is_offline_with_a_reason_and_retried() -> None:
    from tests.support.netns import free_port

    hub = hub_for(f"rtsp://127.0.0.1:{free_port()}/s")
    consumer = hub.subscribe()
    assert not await hub.ready(5)
    assert hub.status.state == "offline"
    assert hub.status.error is not None and "refused" in hub.status.error
    hub.unsubscribe(consumer)
    await hub.close()


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    """One second of H.264 in MP4 (avcC extradata: the source must convert to Annex-B)."""
    return write_clip(tmp_path / "clip.mp4", "libx264", 192, 108, fps=15, frames=15,
                      options={"preset": "ultrafast", "g": "15"})


async def test_a_file_loops_in_real_time(recording: Path) -> None:
    hub = hub_for(f"file://{recording}")
    consumer = hub.subscribe()
    assert await hub.ready(5)
    started = time.monotonic()
    stamps: list[int] = []
    keyframes = decoded = 0
    decoder = av.CodecContext.create("h264", "r")  # no extradata: Annex-B must stand alone
    while len(stamps) < 30:  # two passes over the one-second file
        media, stamp = await asyncio.wait_for(consumer.next(), 5)
        stamps.append(stamp)
        keyframes += media.keyframe
        decoded += len(decoder.decode(av.Packet(media.data)))
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 3.5  # real time, not as fast as the disk allows
    assert stamps == sorted(stamps) and len(set(stamps)) == 30
    assert keyframes >= 2 and decoded >= 25
    hub.unsubscribe(consumer)
    await hub.close()


async def test_a_burst_of_snapshots_decodes_once() -> None:
    from agent.media.snapshot import Snapshotter

    hub = hub_for("testsrc://?size=160x120&fps=15&gop=5")
    viewer = hub.subscribe()  # keeps the pull (and its GOP cache) alive through the test
    snapshots = Snapshotter(cache_seconds=1.0, keyframe_timeout=5.0)
    pictures = await asyncio.gather(*(snapshots.jpeg(hub) for _ in range(8)))
    assert all(p is not None and p.startswith(b"\xff\xd8") for p in pictures)
    assert len(set(pictures)) == 1 and snapshots.decodes == 1
    await asyncio.sleep(1.1)  # cache expired, same keyframe (5 s GOP): still no new decode
    await snapshots.jpeg(hub)
    assert snapshots.decodes == 1
    hub.unsubscribe(viewer)
    await hub.close()
