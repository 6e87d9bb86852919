"""CPU of the agent per extra RTSP client (TCP interleaved), 1080p30 4 Mbit/s camera.

    .venv/bin/python -m tests.bench.bench_rtsp [--clients 20] [--windows 3] [--window 20]

The camera is a pre-encoded clip (FFmpeg/x264 once, into a temporary directory: 1920x1080,
30 fps, 4 Mbit/s, GOP 2 s, no B-frames) served by the GStreamer RTSP server *without
re-encoding* (filesrc ! qtdemux ! h264parse ! rtph264pay: it only parses and payloads), so
the camera costs little of the 2 cores. The clients run in another process and decode
nothing: they read the interleaved RTP and count video frames (marker bits) per client.

Measured: the agent's own CPU (utime+stime from /proc/PID/stat, % of one core) over several
windows with 1 client, then with ``--clients``; per extra client = (many - one) / (n - 1).
Every client's frame rate is checked in every window (a client that cannot keep up would
make the figure meaningless). Goal: <= +0.2 % of one core per extra client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_media import TICKS, summary
from tests.bench.clip import FPS, clip_camera
from tests.support.agent import AgentProcess

# tests.support.agent imports tests.conftest, which turns asyncio debug mode on for every
# process started from here: a benchmark must measure the daemon as it runs in production.
os.environ.pop("PYTHONASYNCIODEBUG", None)

def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


# -- the clients' process ------------------------------------------------------------------


async def _client(port: int, token: str, counts: list[int], index: int,
                  ready: asyncio.Event, started: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = "Basic " + base64.b64encode(f"token:{token}".encode()).decode()
    url = f"rtsp://127.0.0.1:{port}/clip"
    session = ""
    for cseq, (method, target, extra) in enumerate([
            ("DESCRIBE", url, ""),
            ("SETUP", url + "/trackID=0", "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n"),
            ("PLAY", url, "")], start=1):
        with_session = extra + (f"Session: {session}\r\n" if session else "")
        writer.write(f"{method} {target} RTSP/1.0\r\nCSeq: {cseq}\r\nAuthorization: {auth}"
                     f"\r\n{with_session}\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert " 200 " in head.split("\r\n")[0], head
        length = 0
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            if name.lower() == "session":
                session = value.strip().split(";")[0]
        await reader.readexactly(length)
    started[0] += 1
    if started[0] == len(counts):
        ready.set()
    buf = bytearray()
    pos = 0
    while True:
        data = await reader.read(262144)
        if not data:
            return
        buf += data
        while len(buf) - pos >= 4:
            if buf[pos] != 0x24:  # an RTSP message (none expected): skip to its end
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                pos = end + 4
                continue
            size = int.from_bytes(buf[pos + 2:pos + 4], "big")
            if len(buf) - pos < 4 + size:
                break
            if buf[pos + 1] == 0 and size > 2 and buf[pos + 5] & 0x80:
                counts[index] += 1
            pos += 4 + size
        del buf[:pos]
        pos = 0


async def clients_main(port: int, token: str, n: int, window: float, windows: int) -> None:
    counts = [0] * n
    ready = asyncio.Event()
    started = [0]
    tasks = [asyncio.create_task(_client(port, token, counts, i, ready, started))
             for i in range(n)]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(3)  # past the GOP replay
    print("READY", flush=True)
    for _ in range(windows):
        before, start = list(counts), time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - start
        print(json.dumps([round((c - b) / elapsed, 1) for c, b in zip(counts, before,
                                                                      strict=True)]),
              flush=True)
    for task in tasks:
        task.cancel()


# -- the benchmark -------------------------------------------------------------------------


def run_phase(agent: AgentProcess, token: str, n: int, window: float,
              windows: int) -> tuple[list[float], list[float], list[list[float]]]:
    """CPU (% of one core) per window, the system (kernel) part of it, fps per client."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_rtsp", "--clients-process", str(n),
         "--port", str(agent.rtsp_port), "--token", token, "--window", str(window),
         "--windows", str(windows)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    cpu: list[float] = []
    system: list[float] = []
    fps: list[list[float]] = []
    pid = agent.proc.pid
    for _ in range(windows):
        (user0, sys0), start = cpu_split(pid), time.monotonic()
        line = proc.stdout.readline()
        (user1, sys1), elapsed = cpu_split(pid), time.monotonic() - start
        cpu.append((user1 - user0 + sys1 - sys0) / elapsed * 100)
        system.append((sys1 - sys0) / elapsed * 100)
        fps.append(json.loads(line))
    proc.wait(timeout=30)
    return cpu, system, fps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--clip", type=Path, default=None,
                   help="keep the encoded clip here and reuse it on later runs")
    p.add_argument("--clients-process", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clients_process:
        asyncio.run(clients_main(args.port, args.token, args.clients_process, args.window,
                                 args.windows))
        return
    with tempfile.TemporaryDirectory() as tmp, \
            clip_camera(args.clip or Path(tmp) / "clip.mp4") as camera_url:
        agent = asyncio.run(AgentProcess.start(Path(tmp), [{"id": "clip", "source": camera_url}],
                             media={"idle_grace": 600.0}))
        try:
            _, token = asyncio.run(agent.token("--camera", "clip", "--protocol", "rtsp"))
            one_cpu, one_sys, one_fps = run_phase(agent, token, 1, args.window, args.windows)
            many_cpu, many_sys, many_fps = run_phase(agent, token, args.clients, args.window,
                                                     args.windows)
        finally:
            asyncio.run(agent.stop())
    per_client = [(m - o) / (args.clients - 1)
                  for m, o in zip(sorted(many_cpu), sorted(one_cpu), strict=True)]
    slowest = min(min(w) for w in many_fps)
    print(f"agent CPU, % of one core, {args.windows} windows of {args.window:g} s")
    print(f"  1 client:           {summary(one_cpu)}  (fps {one_fps})")
    print(f"  {args.clients} clients:         {summary(many_cpu)}")
    print(f"  per extra client:   {summary(per_client)}  (goal <= 0.2)")
    kernel = [(m - o) / (args.clients - 1)
              for m, o in zip(sorted(many_sys), sorted(one_sys), strict=True)]
    print(f"    of which kernel:  {summary(kernel)}  (socket writes: stime)")
    print(f"  slowest client fps in any window: {slowest} (camera {FPS})")
    if slowest < FPS - 1:
        print("  WARNING: a client fell behind: the figure does not count")


if __name__ == "__main__":
    main()
