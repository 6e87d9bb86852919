"""``testsrc://`` — the built-in demo camera: a moving test pattern encoded in-process.

Small and cheap by default (640x360 at 15 fps, a keyframe every 2 s, ~500 kbit/s, libx264
ultrafast/zerolatency, constrained baseline so every browser decodes it). Options go in the
query: ``testsrc://?size=1280x720&fps=30&gop=2&bitrate=2000``.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av

from agent.errors import SourceError
from agent.media.stream import MediaPacket, StreamInfo

VIDEO_CLOCK = 90_000
# ITU-R BT.601 limited-range YUV of the classic bars: white, yellow, cyan, green, magenta,
# red, blue, black.
BARS = [(180, 128, 128), (162, 44, 142), (131, 156, 44), (112, 72, 58), (84, 184, 198),
        (65, 100, 212), (35, 212, 114), (16, 128, 128)]
BOX = 48  # side of the moving square, in pixels (even)


def parse_options(url: str) -> dict[str, int]:
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    unknown = set(query) - {"size", "fps", "gop", "bitrate"}
    if unknown:
        raise SourceError(f"testsrc: unknown option {sorted(unknown)[0]!r} "
                          "(use size, fps, gop, bitrate)")
    try:
        width, height = (int(v) for v in query.get("size", "640x360").lower().split("x"))
        fps, gop = int(query.get("fps", "15")), int(query.get("gop", "2"))
        bitrate = int(query.get("bitrate", "500"))
    except ValueError:
        raise SourceError("testsrc: size is WIDTHxHEIGHT, fps/gop/bitrate whole numbers") from None
    if not (64 <= width <= 3840 and 64 <= height <= 2160 and width % 2 == 0 == height % 2):
        raise SourceError("testsrc: size must be even, from 64x64 to 3840x2160")
    if not (1 <= fps <= 60 and 1 <= gop <= 10 and 50 <= bitrate <= 20_000):
        raise SourceError("testsrc: fps 1-60, gop 1-10 s, bitrate 50-20000 kbit/s")
    return {"width": width, "height": height, "fps": fps, "gop": gop, "bitrate": bitrate}


class TestPatternSource:
    """Colour bars with a square that moves, so every frame differs from the last."""

    def __init__(self, url: str) -> None:
        self._opts = parse_options(url)
        self._encoder: Any = None
        self._frame_index = 0
        self._start = 0.0
        self._pending: list[MediaPacket] = []

    def open(self) -> StreamInfo:
        o = self._opts
        enc = av.CodecContext.create("libx264", "w")
        enc.width, enc.height, enc.pix_fmt = o["width"], o["height"], "yuv420p"
        enc.time_base = Fraction(1, VIDEO_CLOCK)
        enc.framerate = Fraction(o["fps"], 1)
        enc.bit_rate = o["bitrate"] * 1000
        keyint = o["fps"] * o["gop"]
        enc.gop_size = keyint
        enc.options = {
            "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:repeat-headers=1"
                           ":threads=1",
        }
        enc.open()
        self._encoder = enc
        self._planes = self._background()
        self._start = time.monotonic()
        return StreamInfo("h264", o["width"], o["height"], float(o["fps"]), b"")

    def _background(self) -> tuple[bytearray, bytearray, bytearray]:
        w, h = self._opts["width"], self._opts["height"]
        rows = []
        for plane, (pw, ph) in enumerate(((w, h), (w // 2, h // 2), (w // 2, h // 2))):
            line = bytearray()
            for i, color in enumerate(BARS):
                end = pw * (i + 1) // len(BARS)
                line += bytes([color[plane]]) * (end - len(line))
            rows.append(line * ph)
        return rows[0], rows[1], rows[2]

    def _frame(self) -> Any:
        w, h = self._opts["width"], self._opts["height"]
        frame = av.VideoFrame(w, h, "yuv420p")
        y, u, v = (bytearray(p) for p in self._planes)
        n = self._frame_index
        x0 = (n * 8) % (w - BOX)  # one pass across the picture every few seconds
        y0 = (h - BOX) // 2 + int((h // 4) * ((n // 30) % 3 - 1))
        for row in range(y0, y0 + BOX):
            y[row * w + x0: row * w + x0 + BOX] = b"\xeb" * BOX
        for row in range(y0 // 2, (y0 + BOX) // 2):
            u[row * (w // 2) + x0 // 2: row * (w // 2) + (x0 + BOX) // 2] = b"\x80" * (BOX // 2)
            v[row * (w // 2) + x0 // 2: row * (w // 2) + (x0 + BOX) // 2] = b"\x80" * (BOX // 2)
        for plane, data, pw in zip(frame.planes, (y, u, v), (w, w // 2, w // 2), strict=True):
            if plane.line_size == pw:
                plane.update(bytes(data))
            else:  # padded lines
                stride = plane.line_size
                padded = bytearray(stride * (len(data) // pw))
                for r in range(len(data) // pw):
                    padded[r * stride: r * stride + pw] = data[r * pw:(r + 1) * pw]
                plane.update(bytes(padded))
        frame.pts = n * VIDEO_CLOCK // self._opts["fps"]
        frame.time_base = Fraction(1, VIDEO_CLOCK)
        return frame

    def read(self) -> MediaPacket:
        while not self._pending:
            due = self._start + self._frame_index / self._opts["fps"]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            frame = self._frame()
            self._frame_index += 1
            for p in self._encoder.encode(frame):
                self._pending.append(MediaPacket(True, bytes(p), int(p.pts),
                                                 Fraction(1, VIDEO_CLOCK), bool(p.is_keyframe)))
        return self._pending.pop(0)

    def close(self) -> None:
        self._encoder = None
