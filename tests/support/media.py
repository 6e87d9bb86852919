"""Small recordings made on the spot for tests (no binary files in the repository)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av


def write_clip(path: Path, codec: str, width: int, height: int, fps: int, frames: int,
               options: dict[str, object] | None = None) -> Path:
    """``frames`` frames of changing flat colour, encoded with ``codec`` into ``path``."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options or {}
        for i in range(frames):
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([(i * 16) % 256]) * plane.buffer_size)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
