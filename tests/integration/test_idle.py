"""An idle agent (one camera nobody watches) sleeps: its threads block and wake only for
what is due, which is what its CPU is made of (docs/field-notes.md, "What the idle agent
spends CPU on").

Wake-ups are read from ``/proc/<pid>/task/*/status``: a thread that blocks (in epoll_wait, on
a lock) and is woken again counts one voluntary context switch.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.agent import AgentProcess, WhepViewer
from tests.support.camera import RtspCamera, rtsp_camera_factory_fixture

__all__ = ["rtsp_camera_factory_fixture"]

SMALL = "testsrc://?size=320x240&fps=15"
#: What the idle daemon is still woken for, per second: the event-loop lag probe (2), the
#: token watcher's full look at the store every 5 s with its worker-thread reads, and the
#: database file check: 3.7-4.5 measured. 17.5 when the token store was polled.
MOST_WAKEUPS = 7.0


def wakeups(pid: int) -> dict[str, int]:
    """Voluntary context switches of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.MULTILINE)
        assert found is not None
        out[task.name] = int(found.group(1))
    return out


async def wakeups_per_second(pid: int, seconds: float = 6.0) -> dict[str, float]:
    """Each thread's wake-ups per second over the next ``seconds``."""
    before = wakeups(pid)
    await asyncio.sleep(seconds)
    return {t: (n - before.get(t, 0)) / seconds for t, n in wakeups(pid).items()}


async def test_an_idle_agent_wakes_only_for_what_is_due(tmp_path: Path) -> None:
    # the default audit flush interval: an idle writer must not wake for it either
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL}],
                                     audit={"flush_interval": 1.0})
    try:
        await agent.token("--camera", "cam1")  # a write by another process, then quiet
        await asyncio.sleep(2)
        per_thread = await wakeups_per_second(agent.proc.pid)
        assert sum(per_thread.values()) <= MOST_WAKEUPS, per_thread
    finally:
        await agent.stop()


#: An always-on camera nobody watches is read every 0.25 s (4 wake-ups a second) on top of
#: the idle agent's own; read at each burst it was 31 more (one per frame at 30 fps).
MOST_WAKEUPS_PULLING = MOST_WAKEUPS + 4 + 4


async def test_an_unwatched_camera_is_read_in_batches_and_a_viewer_starts_at_once(
        tmp_path: Path, rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    """The GOP cache of an always-on camera stays warm at a few wake-ups a second; the first
    viewer still gets its first frame from a current GOP at once, then every frame live."""
    camera = await asyncio.to_thread(rtsp_camera_factory, width=320, height=240, fps=30,
                                     gop=30, bitrate=300)
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": camera.url,
                                                 "always_on": True}],
                                     audit={"flush_interval": 1.0})
    try:
        _, token = await agent.token("--camera", "cam1")
        await asyncio.sleep(3)
        per_thread = await wakeups_per_second(agent.proc.pid)
        assert sum(per_thread.values()) <= MOST_WAKEUPS_PULLING, per_thread
        viewer = WhepViewer(agent.base, "cam1", token)
        started = time.monotonic()
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
        assert time.monotonic() - started < 1.0
        frames, live = 0, time.monotonic()
        while time.monotonic() - live < 3:
            await viewer.frame(timeout=2)
            frames += 1
        assert frames >= 3 * 30 * 0.8, frames  # live: every frame, not batches
        await viewer.close()
    finally:
        await agent.stop()


#: Six cameras watched at 30 fps, each sending on its own clock: read per burst, 200-260
#: wake-ups a second (about 1.3 per frame); on the shared 10 ms timer at most 100, plus the
#: six viewers' RTCP and the idle agent's own.
MOST_WAKEUPS_WATCHED = 150.0
WATCHED = 6


async def _count_frames(viewer: WhepViewer, counts: list[tuple[int, int]], index: int) -> None:
    """Frames decoded, and the RTP timestamp (90 kHz) of the last."""
    while True:
        frame = await viewer.frame(timeout=5)
        counts[index] = (counts[index][0] + 1, frame.pts)


async def test_many_watched_cameras_share_the_loop_s_wake_ups(
        tmp_path: Path, rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    """Many cameras watched at once are read together on one 10 ms timer instead of each
    waking the loop once a frame, and every viewer still gets every frame."""
    cameras = [await asyncio.to_thread(rtsp_camera_factory, width=160, height=120, fps=30,
                                       gop=30, bitrate=100) for _ in range(WATCHED)]
    agent = await AgentProcess.start(
        tmp_path, [{"id": f"cam{i}", "source": c.url} for i, c in enumerate(cameras)],
        audit={"flush_interval": 1.0})
    viewers: list[WhepViewer] = []
    counts = [(0, 0)] * WATCHED
    counting: list[asyncio.Task[None]] = []
    try:
        _, token = await agent.token("--host")
        for i in range(WATCHED):
            viewers.append(WhepViewer(agent.base, f"cam{i}", token, audio=False))
            assert await viewers[i].connect() == 201, viewers[i].body
            counting.append(asyncio.create_task(_count_frames(viewers[i], counts, i)))
        await asyncio.sleep(3)  # the replayed GOPs played, bursts counted, reads shared
        before = list(counts)
        per_thread = await wakeups_per_second(agent.proc.pid)
        for task in counting:
            assert not task.done(), task  # a viewer that stopped getting frames
        # Every frame the camera sent in the window, by their timestamps: how soon this
        # process decodes them depends on its own share of the machine, not the agent's.
        frames = [(count - was, ((pts - was_pts) % 2**32) * 30 // 90_000)
                  for (count, pts), (was, was_pts) in zip(counts, before, strict=True)]
        assert all(got >= sent >= 3 * 30 for got, sent in frames), frames
        assert sum(per_thread.values()) <= MOST_WAKEUPS_WATCHED, per_thread
        assert any(e.get("event") == "camera_reads_shared" for e in agent.log_events())
    finally:
        for task in counting:
            task.cancel()
        for viewer in viewers:
            await viewer.close()
        # (a cancellation can be lost in Python 3.11's wait_for: the viewer's end ends it)
        await asyncio.gather(*counting, return_exceptions=True)
        await agent.stop()


#: One camera watched by many viewers: a wake-up per frame, and per viewer only what the
#: viewer itself sends (receiver reports about once a second, ICE consent checks): 1.2-1.4
#: a viewer measured, bounded at 2.5. Every viewer's sender reports, the loop-lag probe and
#: the token sweep share the beat (agent/beat.py); when each viewer had its own report
#: timers (and aiortc's report loop still ran), 8 viewers woke the agent 47-52 times a
#: second instead of 31-35.
#:
#: The camera sends each frame as one slice, one RTP packet: x264's low-latency frames are
#: an access unit delimiter and a slice per encoder thread, each a packet the camera writes
#: apart, and the agent wakes for each write it has not read yet when it runs. How many it
#: reads together depends on the machine (its CPUs, how the camera and the agent are
#: scheduled): 15 to 45 wake-ups a second from the camera alone, not what this test is about.
VIEWERS = 8
FPS = 15
MOST_WAKEUPS_VIEWED = FPS + 2.5 * VIEWERS + MOST_WAKEUPS


async def test_many_viewers_periodic_work_shares_the_beat(
        tmp_path: Path, rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, width=160, height=120, fps=FPS,
                                     gop=FPS, bitrate=100, frame="one-nal")
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": camera.url}],
                                     audit={"flush_interval": 1.0})
    viewers: list[WhepViewer] = []
    try:
        _, token = await agent.token("--camera", "cam1")
        for _ in range(VIEWERS):
            viewers.append(WhepViewer(agent.base, "cam1", token, audio=False))
            assert await viewers[-1].connect() == 201, viewers[-1].body
        await asyncio.sleep(3)  # the replayed GOPs played: live frames only
        per_thread = await wakeups_per_second(agent.proc.pid, seconds=10)
        if sum(per_thread.values()) > MOST_WAKEUPS_VIEWED:  # lost packets bring NACKs
            lost = [[s.packetsLost for s in (await v.pc.getStats()).values()
                     if s.type == "inbound-rtp"] for v in viewers]
            raise AssertionError(f"wake-ups by thread {per_thread}, packets lost {lost}")
        for viewer in viewers:  # still watching, live
            await viewer.frame(timeout=2)
    finally:
        for viewer in viewers:
            await viewer.close()
        await agent.stop()
