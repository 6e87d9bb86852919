"""What a camera's demux would cost in a child process instead of a thread.

    .venv/bin/python -m tests.bench.bench_child_demux [--seconds 15]

One real camera (GStreamer, 1920x1080@30, 4 Mbit/s, loopback). Thread: the agent's own
source (``make_source``) read in a thread of this process, packets handed to the event loop
the way the hub does. Child: the same source in a child process, each packet pickled over a
pipe to this process's loop. Reports the CPU of both processes (utime+stime, % of one core)
and the latency each packet gains between the demuxer returning it and the loop holding it
(p50/p99), which is what a child process adds on top of the thread.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from agent.config import CameraConfig
from agent.media.sources import make_source
from tests.support.camera import RtspCamera

TICKS = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def child(url: str, seconds: float, out: Connection) -> None:
    source = make_source(CameraConfig(id="bench", source=url), 5.0)
    source.open()
    started = time.process_time()  # steady state: imports and the open left out
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        packet = source.read()
        out.send((time.monotonic(), packet))
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS"))
    print(f"child: {rss}", flush=True)
    out.send(time.process_time() - started)
    source.close()


async def run_child(url: str, seconds: float) -> tuple[list[float], float, float]:
    ours, theirs = mp.Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=child, args=(url, seconds, theirs))
    lags: list[float] = []
    used: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        while ours.poll():
            item = ours.recv()
            if isinstance(item, float):
                used.append(item)
                done.set()
                return
            lags.append(time.monotonic() - item[0])

    proc.start()
    while not ours.poll(30):
        pass
    started_self = cpu(os.getpid())
    loop.add_reader(ours.fileno(), readable)
    await done.wait()
    child_cpu = used[0]
    loop.remove_reader(ours.fileno())
    proc.join()
    return lags, cpu(os.getpid()) - started_self, child_cpu


async def run_thread(url: str, seconds: float) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    def deliver(sent: float) -> None:
        lags.append(time.monotonic() - sent)

    def pull() -> None:
        source = make_source(CameraConfig(id="bench", source=url), 5.0)
        source.open()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            source.read()
            loop.call_soon_threadsafe(deliver, time.monotonic())
        source.close()
        loop.call_soon_threadsafe(done.set)

    started = cpu(os.getpid())
    threading.Thread(target=pull, daemon=True).start()
    await done.wait()
    return lags, cpu(os.getpid()) - started


def ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


async def main(seconds: float) -> None:
    with RtspCamera.start(width=1920, height=1080, fps=30, bitrate=4000) as camera:
        lags, used = await run_thread(camera.url, seconds)
        print(f"thread: agent {used / seconds * 100:.1f} % CPU; loop gets each packet "
              f"p50 {ms(lags, 50):.3f} ms, p99 {ms(lags, 99):.3f} ms after the demuxer")
        lags, parent, child_cpu = await run_child(camera.url, seconds)
        print(f"child:  agent {parent / seconds * 100:.1f} % + child "
              f"{child_cpu / seconds * 100:.1f} % CPU; loop gets each packet "
              f"p50 {ms(lags, 50):.3f} ms, p99 {ms(lags, 99):.3f} ms after the demuxer")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    asyncio.run(main(parser.parse_args().seconds))
