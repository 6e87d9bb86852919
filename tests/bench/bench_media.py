"""Media benchmarks against a real RTSP camera (GStreamer) and real WebRTC viewers.

    .venv/bin/python -m tests.bench.bench_media cpu           # agent CPU per viewer
    .venv/bin/python -m tests.bench.bench_media first-frame   # WHEP time to first frame
    .venv/bin/python -m tests.bench.bench_media relay         # CPU: relay publish + 2 viewers

cpu: one 1920x1080@30, 4 Mbit/s camera; the agent's own CPU (utime+stime from
/proc/PID/stat, % of one core) with no viewer, then 1 to 5 viewers. The viewers run in
another process and do not decode (their RTP, SRTP, DTLS and ICE are real; only the
H.264 decoder is replaced by a counter), so the figure is the agent's alone.
Goals: pull <= 1.5 %, first viewer <= 3 %, each extra viewer <= 0.7 %.

first-frame: camera GOP 2 s; POST sent -> first decoded frame at an aiortc viewer; 20 trials
at random points in the GOP; with the GOP cache and without. Goal with the cache: p50 <= 150
ms, p95 <= 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import write_secret
from tests.support.agent import AgentProcess, WhepViewer
from tests.support.camera import RtspCamera

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def measure(pid: int, seconds: float) -> float:
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start) * 100


VIEWERS_SCRIPT = """
import asyncio, sys, json
import aiortc.rtcrtpreceiver as receiver
class Counter:
    frames = 0
    def decode(self, encoded_frame):
        Counter.frames += 1
        return []
receiver.get_decoder = lambda codec: Counter()
from tests.support.agent import WhepViewer
from tests.conftest import write_secret
async def main():
    base, token = sys.argv[1], sys.argv[2]
    viewers = []
    for line in sys.stdin:
        viewer = WhepViewer(base, "cam", token, audio=False)
        assert await viewer.connect() == 201, viewer.body
        viewers.append(viewer)
        await asyncio.sleep(2)
        print(json.dumps({"viewers": len(viewers), "frames": Counter.frames}), flush=True)
asyncio.run(main())
"""


def bench_cpu(window: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, RtspCamera.start(
            width=1920, height=1080, fps=30, gop=60, bitrate=4000) as camera:
        agent = asyncio.run(AgentProcess.start(
            Path(tmp), [{"id": "cam", "source": camera.url, "always_on": True}]))
        try:
            _, token = asyncio.run(agent.token("--camera", "cam"))
            time.sleep(3)  # connected, warm
            pid = agent.proc.pid
            print(f"camera: 1920x1080@30, 4 Mbit/s (GStreamer RTSP server, pid {camera.pid})")
            idle = measure(pid, window)
            print(f"agent CPU, pull only          : {idle:5.2f} % of one core")
            viewers = subprocess.Popen(
                [sys.executable, "-c", VIEWERS_SCRIPT, agent.base, token],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"})
            assert viewers.stdin is not None and viewers.stdout is not None
            previous = idle
            for n in range(1, 6):
                viewers.stdin.write("add\n")
                viewers.stdin.flush()
                state = json.loads(viewers.stdout.readline())
                load = measure(pid, window)
                print(f"agent CPU, {n} viewer{'s' if n > 1 else ' '}           : {load:5.2f} %"
                      f"   (+{load - previous:4.2f} for this viewer; frames so far "
                      f"{state['frames']})")
                previous = load
            print(f"camera connections: {camera.total_connections}")
            viewers.kill()
        finally:
            asyncio.run(agent.stop())


async def first_frame(base: str, token: str) -> float:
    viewer = WhepViewer(base, "cam", token, audio=False)
    started = time.monotonic()
    assert await viewer.connect() == 201, viewer.body
    await viewer.frame(timeout=10)
    elapsed = time.monotonic() - started
    await viewer.delete()
    await viewer.close()
    return elapsed * 1000


def bench_first_frame(trials: int) -> None:
    with RtspCamera.start(width=1280, height=720, fps=30, gop=60, bitrate=2000) as camera:
        for cache in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                agent = asyncio.run(AgentProcess.start(
                    Path(tmp), [{"id": "cam", "source": camera.url, "always_on": True}],
                    media={"gop_cache": cache}))
                try:
                    _, token = asyncio.run(agent.token("--camera", "cam"))
                    time.sleep(3)
                    rng = random.Random(11)
                    times = []
                    for _ in range(trials):
                        time.sleep(rng.uniform(0.0, 2.0))  # a random point in the 2 s GOP
                        times.append(asyncio.run(first_frame(agent.base, token)))
                    q = statistics.quantiles(times, n=20)
                    print(f"time to first frame, GOP cache {'on ' if cache else 'off'}: "
                          f"p50 {statistics.median(times):6.0f} ms   p95 {q[18]:6.0f} ms   "
                          f"min {min(times):5.0f}   max {max(times):5.0f}   (n={trials})")
                finally:
                    asyncio.run(agent.stop())


def bench_relay(window: float) -> None:
    """Agent CPU for one camera published to the relay while two LAN viewers watch."""
    from tests.support.fake_relay import FakeRelay

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp, RtspCamera.start(
                width=1920, height=1080, fps=30, gop=60, bitrate=4000) as camera:
            async with FakeRelay() as relay:
                secret = Path(tmp) / "publisher.secret"
                write_secret(secret, relay.issue_publisher())
                agent = await AgentProcess.start(
                    Path(tmp), [{"id": "cam", "source": camera.url}], agent={"id": "nvr1"},
                    relay={"url": relay.url, "publisher_token_file": str(secret)})
                try:
                    _, token = await agent.token("--camera", "cam")
                    await relay.wait_agent(timeout=20)
                    session = await relay.publish("cam")
                    await relay.wait_status(session, "live", timeout=20)
                    viewers = subprocess.Popen(
                        [sys.executable, "-c", VIEWERS_SCRIPT, agent.base, token],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert viewers.stdin is not None and viewers.stdout is not None
                    for _ in range(2):
                        viewers.stdin.write("add\n")
                        viewers.stdin.flush()
                        await asyncio.to_thread(viewers.stdout.readline)
                    load = await asyncio.to_thread(measure, agent.proc.pid, window)
                    print(f"agent CPU, 1080p30 4 Mbit/s camera published to the relay + 2 LAN "
                          f"viewers: {load:5.2f} % of one core (camera connections: "
                          f"{camera.total_connections})")
                    viewers.kill()
                finally:
                    await agent.stop()

    asyncio.run(scenario())


def main() -> None:
    # Importing the test support turned asyncio debug mode on (tests/conftest.py); measure
    # the agent as it runs in production.
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cpu", "first-frame", "relay"])
    parser.add_argument("--window", type=float, default=10.0, help="seconds per CPU reading")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    if args.what == "cpu":
        bench_cpu(args.window)
    elif args.what == "relay":
        bench_relay(args.window)
    else:
        bench_first_frame(args.trials)


if __name__ == "__main__":
    main()
