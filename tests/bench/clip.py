"""The benchmarks' camera: a pre-encoded 1080p30 4 Mbit/s clip served by GStreamer as is.

Live x264 at 1080p costs ~45 % of a core and crowds out what a benchmark measures on a
2-core machine, so the clip is encoded once (FFmpeg/x264 into a file: 1920x1080, 30 fps,
4 Mbit/s, GOP 2 s, no B-frames) and the GStreamer RTSP server only parses and payloads it
(filesrc ! qtdemux ! h264parse ! rtph264pay, no re-encoding).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

#: The clip plays once: when it ends the camera's stream ends (viewers fall below 30 fps and
#: the pull reconnects). A 240 s clip ended in the middle of `bench_media cpu`'s third step;
#: 600 s covers every step of the longest run (pull, 1-5 viewers and 20, 20 s windows).
CLIP_SECONDS = 600
FPS = 30
CAMERA_SCRIPT = """
import sys, gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
server = GstRtspServer.RTSPServer(); server.set_address("127.0.0.1"); server.set_service("0")
mounts = int(sys.argv[2])  # 1: /clip; more: /clip0 ... each its own pipeline from the start
for i in range(mounts):
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch("( filesrc location=%s ! qtdemux ! h264parse config-interval=-1 "
                       "! rtph264pay name=pay0 pt=96 )" % sys.argv[1])
    factory.set_shared(True)
    server.get_mount_points().add_factory("/clip" if mounts == 1 else "/clip%d" % i, factory)
server.attach(None)
print("READY rtsp://127.0.0.1:%d/clip" % server.get_bound_port(), flush=True)
GLib.MainLoop().run()
"""


def duration(clip: Path) -> float:
    """The clip's length in seconds (0 if ffprobe cannot tell)."""
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                           "-of", "csv=p=0", str(clip)], capture_output=True, text=True,
                          timeout=60, check=False)
    try:
        return float(done.stdout.strip())
    except ValueError:
        return 0.0


def make_clip(clip: Path) -> None:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=1920x1080:rate={FPS}", "-t", str(CLIP_SECONDS), "-c:v", "libx264",
         "-preset", "ultrafast", "-b:v", "4M", "-maxrate", "4M", "-bufsize", "4M",
         "-g", str(2 * FPS), "-bf", "0", "-pix_fmt", "yuv420p", "-y", str(clip)],
        check=True, timeout=900)


@contextlib.contextmanager
def clip_cameras(clip: Path, count: int) -> Iterator[list[str]]:
    """Serve ``clip`` (encoded first if the file is missing) as ``count`` cameras, each its
    own pipeline (one shared media would start late joiners mid-GOP); yields their URLs."""
    if not clip.exists() or duration(clip) < CLIP_SECONDS - 1:
        print(f"encoding a {CLIP_SECONDS} s 1080p30 4 Mbit/s clip once…", flush=True)
        make_clip(clip)
    camera = subprocess.Popen(["/usr/bin/python3", "-c", CAMERA_SCRIPT, str(clip), str(count)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert camera.stdout is not None
        url = camera.stdout.readline().split()[1]
        yield [url] if count == 1 else [f"{url}{i}" for i in range(count)]
    finally:
        camera.terminate()
        camera.wait(timeout=10)


@contextlib.contextmanager
def clip_camera(clip: Path) -> Iterator[str]:
    """One camera serving ``clip``; yields its RTSP URL."""
    with clip_cameras(clip, 1) as urls:
        yield urls[0]
