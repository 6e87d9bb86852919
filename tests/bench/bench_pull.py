"""A camera pull's CPU: FFmpeg's RTSP client against the agent's own, in alternating windows.

    .venv/bin/python -m tests.bench.bench_pull [--window 15] [--windows 4] [--clip PATH]

Camera: the pre-encoded 1920x1080@30 4 Mbit/s clip served by GStreamer without re-encoding
(tests/bench/clip.py), over TCP on loopback. Each window opens one source in a thread of
this process and reads it as the hub's pull thread does, for ``--window`` seconds; the
thread's own CPU (kernel time included: the socket reads) is printed per window in % of
one core, then min/median/max per client. The two clients alternate, so a machine that is
busier for a while weighs on both. Each window also checks the frame rate (30 fps).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from agent.media.sources.native import native_source
from agent.media.sources.pyav import rtsp_source
from tests.bench import clip as clips


def pull(source: Any, seconds: float, out: list[tuple[float, float]]) -> None:
    source.open()
    frames = 0
    for _ in range(30):  # past the open's burst
        source.read()
    started, cpu = time.monotonic(), time.thread_time()
    while time.monotonic() - started < seconds:
        if source.read().video:
            frames += 1
    elapsed = time.monotonic() - started
    out.append(((time.thread_time() - cpu) / elapsed * 100, frames / elapsed))
    source.close()


def window(kind: str, url: str, seconds: float) -> tuple[float, float]:
    if kind == "ffmpeg":
        source: Any = rtsp_source(url, transport="tcp", timeout=5.0, username=None,
                                  password=None, audio_mode="off")
    else:
        source = native_source(url, timeout=5.0, username=None, password=None,
                               audio_mode="off")
    out: list[tuple[float, float]] = []
    thread = threading.Thread(target=pull, args=(source, seconds, out))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--clip", type=Path, default=Path("/tmp/therelay-bench-clip.mp4"))
    args = parser.parse_args()
    loads: dict[str, list[float]] = {"ffmpeg": [], "agent": []}
    with clips.clip_camera(args.clip) as url:
        for _ in range(args.windows):
            for kind, values in loads.items():
                load, fps = window(kind, url, args.window)
                values.append(load)
                print(f"{kind:6s}: {load:5.2f} % of one core, {fps:4.1f} fps"
                      f"{'  INVALID: below the camera rate' if fps < clips.FPS - 1 else ''}",
                      flush=True)
    for kind, values in loads.items():
        print(f"{kind:6s} client: min {min(values):.2f}  median {statistics.median(values):.2f}"
              f"  max {max(values):.2f} % of one core")


if __name__ == "__main__":
    main()
