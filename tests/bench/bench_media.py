"""Media benchmarks against a real RTSP camera (GStreamer) and real WebRTC viewers.

    .venv/bin/python -m tests.bench.bench_media cpu [--clip /tmp/clip.mp4] [--viewers 20]
    .venv/bin/python -m tests.bench.bench_media cameras [--cameras 8]  # N cameras x 1 viewer
    .venv/bin/python -m tests.bench.bench_media first-frame   # WHEP time to first frame
    .venv/bin/python -m tests.bench.bench_media relay         # CPU: relay publish + 2 viewers
    .venv/bin/python -m tests.bench.bench_media compare --against REV [--viewers 1]

cpu: a pre-encoded 1920x1080@30 4 Mbit/s clip (GOP 2 s, no B-frames) served by GStreamer
without re-encoding (tests/bench/clip.py); the agent's own CPU (utime+stime from
/proc/PID/stat, % of one core) over ``--windows`` windows of ``--window`` s (min/median/max)
with no viewer, then 1 to 5 viewers (and ``--viewers`` N if more), and its RSS. The viewers
run in another process whose event loop is never blocked (control lines are read through the
loop) and do not decode (their RTP, SRTP, DTLS and ICE are real; only the H.264 decoder is
replaced by a per-viewer counter); each viewer's frame rate is printed for every step, and a
step where one falls below the camera's rate is marked INVALID.
Goals (issue 14): pull <= 1.0 %, first viewer <= +1.0 %, each extra viewer <= +0.4 %.
First, the floor (tests/bench/floor.py): a bare asyncio process doing the same per-frame
I/O as the agent with one viewer and nothing else, on the same machine in the same run.

Every mode runs the agent as an installer has it (build/bench-venv, no test tools) and
lets the harness use every core (tests/bench/installed.py).

compare: this checkout's agent against the one of git revision ``--against`` (a worktree in
build/compare/), in turns within one run, each with a fresh camera, the order swapped every
round: the pull, then ``--viewers`` viewers, ``--windows`` windows of ``--window`` s each.
This shared VM's speed drifts within an hour by more than most changes do, so a change is
judged this way, not by figures from two runs (docs/field-notes.md).

first-frame: the same clip (GOP 2 s); POST sent -> first decoded frame at an aiortc viewer;
20 trials at random points in the GOP, with the GOP cache and without. The process's first
viewer, which also loads the WebRTC stack, is reported apart. Goal with the cache (issue 14):
p50 <= 100 ms, p95 <= 200 ms.
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

from tests.bench import floor
from tests.bench.clip import FPS, clip_camera, clip_cameras
from tests.bench.installed import measure_as_installed
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


# -- the viewers' process -------------------------------------------------------------------
# Control lines arrive on stdin, read through the event loop (a blocking read would freeze
# the viewers during every window): "add" connects one more viewer, "mark" starts a window,
# "report" prints each viewer's frames per second since the mark.


async def viewers_main(base: str, token: str) -> None:
    import aiortc.rtcrtpreceiver as receiver

    counts: list[int] = []

    class Counter:  # replaces the H.264 decoder: the viewers count frames, decode nothing
        def __init__(self) -> None:
            self.index = len(counts)
            counts.append(0)

        def decode(self, encoded_frame: object) -> list[object]:
            counts[self.index] += 1
            return []

    receiver.get_decoder = lambda codec: Counter()  # type: ignore[attr-defined,assignment,return-value]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    viewers: list[WhepViewer] = []
    marked: tuple[float, list[int]] = (time.monotonic(), [])
    while line := (await reader.readline()).decode().strip():
        if line.startswith("add"):
            camera = line.split()[1] if " " in line else "cam"
            viewer = WhepViewer(base, camera, token, audio=False)
            assert await viewer.connect() == 201, viewer.body
            viewers.append(viewer)
            await asyncio.sleep(3)  # past the GOP replay
            print(json.dumps({"viewers": len(viewers)}), flush=True)
        elif line == "mark":
            marked = (time.monotonic(), list(counts))
        elif line == "report":
            elapsed = time.monotonic() - marked[0]
            print(json.dumps([round((c - b) / elapsed, 1)
                              for c, b in zip(counts, marked[1], strict=False)]), flush=True)


class Viewers:
    """The viewers' process, driven from the benchmark."""

    def __init__(self, base: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bench_media", "viewers-process",
             "--base", base, "--token", token],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"})

    def _say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline() if line != "mark" else ""

    def add(self, camera: str = "cam") -> None:
        json.loads(self._say(f"add {camera}"))

    def window(self, pid: int, seconds: float) -> tuple[float, list[float]]:
        """The agent's CPU (% of one core) over one window, and each viewer's fps in it."""
        self._say("mark")
        load = measure(pid, seconds)
        return load, json.loads(self._say("report"))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def memory(pid: int) -> str:
    """RSS, and the anonymous part of it (the process's own heap). The rest, pages of shared
    libraries, varies by several MB with what the page cache holds (docs/field-notes.md)."""
    kb = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            kb[name] = int(value.split()[0])
    return f"RSS {kb['VmRSS'] / 1024:5.1f} MB (anon {kb['RssAnon'] / 1024:4.1f})"


def summary(values: list[float]) -> str:
    return (f"min {min(values):5.2f}  median {statistics.median(values):5.2f}  "
            f"max {max(values):5.2f}")


def webrtc_section(send_path: str) -> dict[str, object]:
    return {"host_addresses": ["127.0.0.1"], "send_path": send_path}


def bench_cpu(window: float, windows: int, most: int, clip: Path | None,
              send_path: str = "agent") -> None:
    """Agent CPU with the pull alone, then 1..5 viewers (and ``most`` if more than 5)."""
    steps = [*range(1, 6), *([most] if most > 5 else [])]
    floor.report(window, windows, cpu_seconds)  # this machine's speed, today
    with tempfile.TemporaryDirectory() as tmp, \
            clip_camera(clip or Path(tmp) / "clip.mp4") as camera_url:
        agent = asyncio.run(AgentProcess.start(Path(tmp), [{"id": "cam", "source": camera_url,
                                          "always_on": True}],
                             webrtc=webrtc_section(send_path)))
        viewers: Viewers | None = None
        try:
            _, token = asyncio.run(agent.token("--camera", "cam"))
            time.sleep(3)  # connected, warm
            pid = agent.proc.pid
            print(f"camera: pre-encoded 1920x1080@30 4 Mbit/s clip; {windows} windows of "
                  f"{window:g} s each; agent CPU in % of one core; send path {send_path}")
            loads = {0: [measure(pid, window) for _ in range(windows)]}
            print(f"pull only       : {summary(loads[0])}   {memory(pid)}",
                  flush=True)
            viewers = Viewers(agent.base, token)
            invalid = False
            count = 0
            for n in steps:
                while count < n:
                    viewers.add()
                    count += 1
                loads[n], slowest = [], FPS * 2.0
                for _ in range(windows):
                    load, fps = viewers.window(pid, window)
                    loads[n].append(load)
                    slowest = min(slowest, *fps)
                bad = slowest < FPS - 1
                invalid |= bad
                if bad:  # say why: the agent's own account of a viewer it held back
                    for event in agent.log_events():
                        if event.get("event") in ("webrtc_viewer_behind",
                                                  "webrtc_pair_switched"):
                            print(f"    agent: {event}", flush=True)
                print(f"{n:2d} viewer{'s' if n > 1 else ' '}     : {summary(loads[n])}   "
                      f"{memory(pid)}   slowest viewer {slowest:4.1f} fps"
                      f"{'  INVALID: a viewer fell behind the camera' if bad else ''}",
                      flush=True)
            medians = {n: statistics.median(v) for n, v in loads.items()}
            extra = [(medians[n] - medians[1]) / (n - 1) for n in steps if n > 1]
            print(f"first viewer over the pull (medians): +{medians[1] - medians[0]:.2f}")
            print(f"each extra viewer (medians, per viewer, 2..{steps[-1]}): "
                  + "  ".join(f"{e:+.2f}" for e in extra))
            if invalid:
                print("WARNING: some windows do not count (a viewer below the camera rate)")
        finally:
            if viewers is not None:
                viewers.stop()
            asyncio.run(agent.stop())


def bench_cameras(window: float, windows: int, cameras: int, clip: Path | None,
                  send_path: str = "agent") -> None:
    """Agent CPU with ``cameras`` cameras (the same clip, one pull each) and one viewer each."""
    with tempfile.TemporaryDirectory() as tmp, \
            clip_cameras(clip or Path(tmp) / "clip.mp4", cameras) as urls:
        ids = [f"cam{i}" for i in range(cameras)]
        listed = [{"id": i, "source": url, "always_on": True}
                  for i, url in zip(ids, urls, strict=True)]
        agent = asyncio.run(AgentProcess.start(Path(tmp), listed,
                                               webrtc=webrtc_section(send_path)))
        viewers: Viewers | None = None
        try:
            _, token = asyncio.run(agent.token("--host"))
            time.sleep(5)  # connected, warm
            pid = agent.proc.pid
            pulls = [measure(pid, window) for _ in range(windows)]
            print(f"{cameras} cameras, pull only : {summary(pulls)}   {memory(pid)}",
                  flush=True)
            viewers = Viewers(agent.base, token)
            for camera_id in ids:
                viewers.add(camera_id)
            loads, slowest = [], FPS * 2.0
            for _ in range(windows):
                load, fps = viewers.window(pid, window)
                loads.append(load)
                slowest = min(slowest, *fps)
            print(f"{cameras} cameras x 1 viewer: {summary(loads)}   {memory(pid)}   "
                  f"slowest viewer {slowest:4.1f} fps"
                  f"{'  INVALID: a viewer fell behind the camera' if slowest < FPS - 1 else ''}")
        finally:
            if viewers is not None:
                viewers.stop()
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


def worktree(rev: str) -> Path:
    """A checkout of git revision ``rev`` in build/compare/ (made once per commit)."""
    root = Path(__file__).resolve().parents[2]
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    path = root / "build" / "compare" / sha[:12]
    if not (path / "agent").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=root,
                       capture_output=True, check=True)
    return path


def compare_once(cwd: Path, viewers: int, window: float, windows: int,
                 clip: Path) -> tuple[list[float], list[float], float]:
    """One agent (the package in ``cwd``) with a fresh camera: its CPU pulled, then with
    ``viewers`` viewers; and the slowest viewer's fps."""
    AgentProcess.cwd = cwd
    with tempfile.TemporaryDirectory() as tmp, clip_camera(clip) as camera_url:
        agent = asyncio.run(AgentProcess.start(
            Path(tmp), [{"id": "cam", "source": camera_url, "always_on": True}],
            webrtc=webrtc_section("agent")))
        watching: Viewers | None = None
        try:
            _, token = asyncio.run(agent.token("--camera", "cam"))
            time.sleep(3)
            pid = agent.proc.pid
            pulled = [measure(pid, window) for _ in range(windows)]
            watching = Viewers(agent.base, token)
            for _ in range(viewers):
                watching.add()
            time.sleep(3)  # the replayed GOPs played
            watched, slowest = [], FPS * 2.0
            for _ in range(windows):
                load, fps = watching.window(pid, window)
                watched.append(load)
                slowest = min(slowest, *fps)
            return pulled, watched, slowest
        finally:
            if watching is not None:
                watching.stop()
            asyncio.run(agent.stop())


def bench_compare(rev: str, viewers: int, rounds: int, window: float, windows: int,
                  clip: Path | None) -> None:
    """This checkout's agent against revision ``rev``'s, in turns, the order swapped each
    round so that the machine's drift weighs on both alike. ``python -m agent`` run in the
    worktree takes its ``agent`` package from there; a module the revision lacks would come
    from the venv's editable install of this checkout, which only code importing a module
    it does not have (never the revision's own) could reach."""
    sides = {"this checkout": Path(__file__).resolve().parents[2], rev: worktree(rev)}
    pulls: dict[str, list[float]] = {name: [] for name in sides}
    added: dict[str, list[float]] = {name: [] for name in sides}
    print(f"{rounds} rounds; each: a fresh camera, the pull, then {viewers} viewer(s); "
          f"{windows} windows of {window:g} s; agent CPU in % of one core")
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip or Path(tmp) / "clip.mp4"
        for index in range(rounds):
            for name in (list(sides) if index % 2 == 0 else list(sides)[::-1]):
                pulled, watched, slowest = compare_once(sides[name], viewers, window,
                                                        windows, clip)
                pull = statistics.median(pulled)
                pulls[name] += pulled
                added[name] += [load - pull for load in watched]
                print(f"round {index + 1}, {name:>14s}: pull {pull:5.2f}, with viewers "
                      f"{' '.join(f'{w:5.2f}' for w in watched)}; slowest viewer "
                      f"{slowest:4.1f} fps{'  INVALID' if slowest < FPS * 0.97 else ''}",
                      flush=True)
    for name in sides:
        print(f"{name:>14s}: pull {summary(pulls[name])}; viewers over the pull "
              f"{summary(added[name])}")
    AgentProcess.cwd = None


def bench_first_frame(trials: int, clip: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            clip_camera(clip or Path(tmp) / "clip.mp4") as camera_url:
        for cache in (True, False):
            with tempfile.TemporaryDirectory() as state:
                agent = asyncio.run(AgentProcess.start(
                    Path(state), [{"id": "cam", "source": camera_url, "always_on": True}],
                    media={"gop_cache": cache}))
                try:
                    _, token = asyncio.run(agent.token("--camera", "cam"))
                    time.sleep(3)
                    # The process's first viewer also loads the WebRTC stack (agent/webrtc/
                    # stack.py): reported on its own, not one of the trials.
                    loading = asyncio.run(first_frame(agent.base, token))
                    rng = random.Random(11)
                    times = []
                    for _ in range(trials):
                        time.sleep(rng.uniform(0.0, 2.0))  # a random point in the 2 s GOP
                        times.append(asyncio.run(first_frame(agent.base, token)))
                    q = statistics.quantiles(times, n=20)
                    print(f"time to first frame, GOP cache {'on ' if cache else 'off'}: "
                          f"p50 {statistics.median(times):6.0f} ms   p95 {q[18]:6.0f} ms   "
                          f"min {min(times):5.0f}   max {max(times):5.0f}   (n={trials}); "
                          f"the process's first viewer (loads the WebRTC stack) {loading:.0f} ms")
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
                    viewers = Viewers(agent.base, token)
                    for _ in range(2):
                        await asyncio.to_thread(viewers.add)
                    load, fps = await asyncio.to_thread(viewers.window, agent.proc.pid, window)
                    print(f"agent CPU, 1080p30 4 Mbit/s camera published to the relay + 2 LAN "
                          f"viewers: {load:5.2f} % of one core (viewers' fps {fps}; camera "
                          f"connections: {camera.total_connections})")
                    viewers.stop()
                finally:
                    await agent.stop()

    asyncio.run(scenario())


def main() -> None:
    # Importing the test support turned asyncio debug mode on (tests/conftest.py); measure
    # the agent as it runs in production.
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cpu", "cameras", "first-frame", "relay", "compare",
                                         "viewers-process"])
    parser.add_argument("--against", default="HEAD",
                        help="compare: the git revision to measure this checkout against")
    parser.add_argument("--rounds", type=int, default=3, help="compare: rounds")
    parser.add_argument("--cameras", type=int, default=8, help="cameras: how many")
    parser.add_argument("--send-path", choices=["agent", "aiortc"], default="agent",
                        help="webrtc.send_path of the measured agent")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per CPU reading")
    parser.add_argument("--windows", type=int, default=3, help="readings per step")
    parser.add_argument("--viewers", type=int, default=5, help="the last step's viewers")
    parser.add_argument("--clip", type=Path, default=None,
                        help="keep the encoded clip here and reuse it on later runs")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "viewers-process":
        asyncio.run(viewers_main(args.base, args.token))
        return
    measure_as_installed()
    if args.what == "cpu":
        bench_cpu(args.window, args.windows, args.viewers, args.clip, args.send_path)
    elif args.what == "cameras":
        bench_cameras(args.window, args.windows, args.cameras, args.clip, args.send_path)
    elif args.what == "relay":
        bench_relay(args.window)
    elif args.what == "compare":
        bench_compare(args.against, args.viewers, args.rounds, args.window, args.windows,
                      args.clip)
    else:
        bench_first_frame(args.trials, args.clip)


if __name__ == "__main__":
    main()
