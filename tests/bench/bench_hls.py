"""HLS benchmarks: the agent's CPU for LL-HLS muxing and per HLS viewer, the latency from a
frame reaching the agent to its part in a blocking playlist answer, and the fMP4 writer
against PyAV's mp4 muxer.

    .venv/bin/python -m tests.bench.bench_hls cpu [--clip /tmp/clip.mp4] [--viewers 5]
    .venv/bin/python -m tests.bench.bench_hls mux [--clip /tmp/clip.mp4]

cpu: the pre-encoded 1920x1080@30 4 Mbit/s clip (GOP 2 s, no B-frames) served by GStreamer
without re-encoding (tests/bench/clip.py); the agent's CPU (utime+stime of its process, % of
one core) over ``--windows`` windows of ``--window`` s (min/median/max): the pull alone, then
1 HLS viewer (the muxer starts with it), then ``--viewers``. The viewers run in another
process (not in asyncio debug mode) and behave like an LL-HLS player: a blocking playlist
reload for the next part (``_HLS_msn``/``_HLS_part``), then every new part listed. Each
viewer's parts are checked to follow each other without a gap; a step where one missed a part
is marked INVALID. Latency: when a blocking reload answers, its newest part's first frame
reached the agent at PROGRAM-DATE-TIME of its segment + the parts before it (the date is when
the segment's keyframe reached the agent; the camera sends in real time): answer time minus
that, for the first and for the last frame of the part. Goal (issue 17): <= 3 part durations.

mux: 60 s of the clip's access units (Annex-B bytes, as the hub has them) into fMP4
fragments of 0.5 s, by agent/hls/fmp4.py and by PyAV's mp4 muxer (a packet made from the
bytes per frame; movflags frag_keyframe+empty_moov+default_base_moof, frag_duration 0.5 s):
CPU seconds per second of video, 7 runs each.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from tests.bench.bench_media import measure, memory, summary
from tests.bench.clip import FPS, clip_camera, make_clip
from tests.bench.installed import measure_as_installed
from tests.support.agent import AgentProcess

PART = 0.5

# -- the viewers' process ---------------------------------------------------------------------

_PART_LINE = re.compile(r'#EXT-X-PART:DURATION=([\d.]+),URI="part(\d+)\.(\d+)\.m4s"')
_DATE = re.compile(r"#EXT-X-PROGRAM-DATE-TIME:(\S+)")
_HINT = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"')


def parse(playlist: str) -> tuple[dict[int, float], list[tuple[int, int, float, float]]]:
    """Segment dates by msn, and the parts listed: (msn, index, start offset, duration)."""
    dates: dict[int, float] = {}
    parts: list[tuple[int, int, float, float]] = []
    date: float | None = None  # of the segment whose lines come next
    extinf = 0.0
    offsets: dict[int, float] = {}
    for line in playlist.splitlines():
        if (m := _DATE.match(line)) is not None:
            date = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        elif (m := _PART_LINE.match(line)) is not None:
            msn, index, duration = int(m.group(2)), int(m.group(3)), float(m.group(1))
            if date is not None and msn not in dates:
                dates[msn] = date
            parts.append((msn, index, offsets.get(msn, 0.0), duration))
            offsets[msn] = offsets.get(msn, 0.0) + duration
        elif line.startswith("#EXTINF:"):
            extinf = float(line[8:].rstrip(","))
        elif line.startswith("seg"):  # the next segment follows it (continuous dates)
            date = date + extinf if date is not None else None
    return dates, parts


class Viewer:
    def __init__(self, http: Any, base: str, camera: str, token: str) -> None:
        self.http, self.base, self.camera, self.token = http, base, camera, token
        self.parts = 0
        self.bytes = 0
        self.gaps = 0
        self.latency_first: list[float] = []
        self.latency_last: list[float] = []
        self.session = ""

    async def run(self) -> None:
        async with self.http.get(f"{self.base}/hls/{self.camera}/index.m3u8",
                                 headers={"Authorization": f"Bearer {self.token}"}) as r:
            assert r.status == 200, await r.text()
            variant = (await r.text()).strip().splitlines()[-1]
        self.session = f"{self.base}/hls/{self.camera}/{variant.removesuffix('live.m3u8')}"
        async with self.http.get(self.session + "init.mp4") as r:
            self.bytes += len(await r.read())
        async with self.http.get(self.session + "live.m3u8") as r:
            text = await r.text()
        hint = _HINT.search(text)
        assert hint is not None
        msn, index = int(hint.group(1)), int(hint.group(2))
        last: tuple[int, int] | None = None
        while True:
            url = f"{self.session}live.m3u8?_HLS_msn={msn}&_HLS_part={index}"
            async with self.http.get(url) as r:
                text = await r.text()
                answered = time.time()
                assert r.status == 200, text
            dates, parts = parse(text)
            new = [p for p in parts if last is None or p[:2] > last]
            if new:
                newest = new[-1]
                if newest[0] in dates:
                    arrived = dates[newest[0]] + newest[2]
                    self.latency_first.append(answered - arrived)
                    self.latency_last.append(answered - arrived - newest[3] + 1 / FPS)
            for p_msn, p_index, _, _ in new:
                if last is not None and not (
                        (p_msn == last[0] and p_index == last[1] + 1)
                        or (p_msn == last[0] + 1 and p_index == 0)):
                    self.gaps += 1
                async with self.http.get(f"{self.session}part{p_msn}.{p_index}.m4s") as r:
                    assert r.status == 200
                    self.bytes += len(await r.read())
                self.parts += 1
                last = (p_msn, p_index)
            hint = _HINT.search(text)
            assert hint is not None
            msn, index = int(hint.group(1)), int(hint.group(2))


async def viewers_main(base: str, token: str) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    viewers: list[Viewer] = []
    tasks: list[asyncio.Task[None]] = []
    marked: list[tuple[int, int, int, int]] = []
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        while line := (await reader.readline()).decode().strip():
            if line == "add":
                viewer = Viewer(http, base, "cam", token)
                viewers.append(viewer)
                tasks.append(asyncio.create_task(viewer.run()))
                await asyncio.sleep(4)  # past the first segments
                for task in tasks:
                    if task.done():
                        task.result()  # a viewer that failed: say why
                print(json.dumps({"viewers": len(viewers)}), flush=True)
            elif line == "mark":
                started = time.monotonic()
                marked = [(v.parts, v.gaps, len(v.latency_first), v.bytes) for v in viewers]
                print("{}", flush=True)
            elif line == "report":
                elapsed = time.monotonic() - started
                out = []
                for v, (parts, gaps, lat, size) in zip(viewers, marked, strict=False):
                    out.append({"parts_per_s": round((v.parts - parts) / elapsed, 2),
                                "gaps": v.gaps - gaps,
                                "kbit_s": round((v.bytes - size) * 8 / elapsed / 1000),
                                "latency_first": v.latency_first[lat:],
                                "latency_last": v.latency_last[lat:]})
                print(json.dumps(out), flush=True)


class Viewers:
    def __init__(self, base: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bench_hls", "viewers-process", "--base", base,
             "--token", token], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"})

    def say(self, line: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def window(self, pid: int, seconds: float) -> tuple[float, list[dict[str, Any]]]:
        self.say("mark")
        load = measure(pid, seconds)
        return load, self.say("report")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def bench_cpu(window: float, windows: int, most: int, clip: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            clip_camera(clip or Path(tmp) / "clip.mp4") as camera_url:
        agent = asyncio.run(AgentProcess.start(
            Path(tmp), [{"id": "cam", "source": camera_url, "always_on": True}],
            hls={"part_duration": PART}))
        viewers: Viewers | None = None
        try:
            _, token = asyncio.run(agent.token("--camera", "cam"))
            time.sleep(3)
            pid = agent.proc.pid
            print(f"camera: pre-encoded 1920x1080@30 4 Mbit/s clip, GOP 2 s; parts {PART} s; "
                  f"{windows} windows of {window:g} s; agent CPU in % of one core")
            loads = {0: [measure(pid, window) for _ in range(windows)]}
            print(f"pull only          : {summary(loads[0])}   {memory(pid)}",
                  flush=True)
            viewers = Viewers(agent.base, token)
            count, first, last = 0, [], []
            for n in sorted({1, 2, most}):
                while count < n:
                    viewers.say("add")
                    count += 1
                loads[n], slowest, gaps = [], 99.0, 0
                for _ in range(windows):
                    load, report = viewers.window(pid, window)
                    loads[n].append(load)
                    slowest = min(slowest, *(v["parts_per_s"] for v in report))
                    gaps += sum(v["gaps"] for v in report)
                    for v in report:
                        first += v["latency_first"]
                        last += v["latency_last"]
                bad = gaps > 0 or slowest < 1 / PART * 0.9
                print(f"{n:2d} HLS viewer{'s' if n > 1 else ' '}    : {summary(loads[n])}   "
                      f"{memory(pid)}   slowest viewer {slowest:4.2f} parts/s, "
                      f"{gaps} gaps{'  INVALID' if bad else ''}", flush=True)
            medians = {n: statistics.median(v) for n, v in loads.items()}
            print(f"HLS muxing (1 viewer over the pull, medians): "
                  f"+{medians[1] - medians[0]:.2f} % of a core")
            print(f"each extra HLS viewer (medians, 1 -> {most}): "
                  f"{(medians[most] - medians[1]) / (most - 1):+.2f} % of a core")
            for name, values in (("first", first), ("last", last)):
                q = statistics.quantiles(values, n=20)
                print(f"latency, a part's {name} frame reaching the agent -> the part in a "
                      f"blocking playlist answer: p50 {statistics.median(values) * 1000:4.0f} "
                      f"ms  p95 {q[18] * 1000:4.0f} ms  max {max(values) * 1000:4.0f} ms "
                      f"(n={len(values)}; goal <= {3 * PART * 1000:.0f} ms)")
        finally:
            if viewers is not None:
                viewers.stop()
            asyncio.run(agent.stop())


# -- the writer alone ---------------------------------------------------------------------------


def bench_mux(clip: Path | None) -> None:
    import av
    from av.bitstream import BitStreamFilterContext

    from agent.hls import fmp4

    with tempfile.TemporaryDirectory() as tmp:
        path = clip or Path(tmp) / "clip.mp4"
        if not path.exists():
            make_clip(path)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
            units = list(itertools.islice(
                ((bytes(p), bool(p.is_keyframe)) for packet in container.demux(stream)
                 if packet.size for p in bsf.filter(packet)), FPS * 60))
            seconds = len(units) / FPS
            per_part = int(FPS * PART)

            def ours() -> tuple[float, int]:
                started = time.process_time()
                size = len(fmp4.init_segment(fmp4.video_track("h264", 1920, 1080, units[0][0])))
                for n, i in enumerate(range(0, len(units), per_part)):
                    samples = [fmp4.Sample(fmp4.length_prefixed("h264", d), 3000, k)
                               for d, k in units[i:i + per_part]]
                    size += len(fmp4.fragment(n + 1, i * 3000, samples))
                return time.process_time() - started, size

            def theirs() -> tuple[float, int]:
                """The same bytes through PyAV: a packet object per frame, as the agent would
                have to make from the hub's bytes, and FFmpeg's fragmenting mp4 muxer."""
                started = time.process_time()
                buffer = io.BytesIO()
                muxed = av.open(buffer, "w", format="mp4", options={
                    "movflags": "frag_keyframe+empty_moov+default_base_moof",
                    "frag_duration": str(int(PART * 1_000_000))})
                out_stream = muxed.add_stream_from_template(stream)
                for n, (data, keyframe) in enumerate(units):
                    packet = av.Packet(data)
                    packet.pts = packet.dts = n
                    packet.time_base = Fraction(1, FPS)
                    packet.is_keyframe = keyframe
                    packet.stream = out_stream
                    muxed.mux(packet)
                muxed.close()
                return time.process_time() - started, buffer.tell()

            runs = {"agent/hls/fmp4.py": [ours() for _ in range(7)],
                    "PyAV mp4 muxer": [theirs() for _ in range(7)]}
        print(f"fMP4 writer, {seconds:.0f} s of 1080p30 4 Mbit/s H.264 (Annex-B) in {PART} s "
              "fragments, CPU in % of one core over 7 runs:")
        for name, results in runs.items():
            loads = [cpu / seconds * 100 for cpu, _ in results]
            print(f"  {name:18s}: min {min(loads):.3f}  median {statistics.median(loads):.3f}"
                  f"   ({results[0][1] / seconds * 8 / 1e6:.2f} Mbit/s out)")


def main() -> None:
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cpu", "mux", "viewers-process"])
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--clip", type=Path, default=None)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "viewers-process":
        asyncio.run(viewers_main(args.base, args.token))
        return
    measure_as_installed()
    if args.what == "cpu":
        bench_cpu(args.window, args.windows, args.viewers, args.clip)
    else:
        bench_mux(args.clip)


if __name__ == "__main__":
    main()
