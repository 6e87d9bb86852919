"""CPU of the RTP depacketizer (agent/media/depacketize.py) per RTP packet.

    .venv/bin/python -m tests.bench.bench_depacketize [--clip /tmp/depay.mp4] [--size 1200]

A 10 s 1920x1080@30 4 Mbit/s clip (x264 ultrafast, GOP 2 s, no B-frames; encoded once if
the file is missing) is put in RTP packets by the agent's own packetizer (agent/media/rtp.py,
``--size`` bytes of payload), headers included, beforehand. Timed: ``parse_rtp`` and
``H264Depacketizer.push`` for every packet, as the native RTSP client calls them; best and
median of 7 runs, in µs per packet and % of one core at the clip's packet rate. The access
units that come out are checked against the clip's.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av

from agent.media.depacketize import AccessUnit, H264Depacketizer, parse_rtp
from agent.media.rtp import H264Packetizer, split_annexb
from agent.media.stream import MediaPacket, annexb_parameter_sets

SECONDS = 10


def access_units(clip: Path) -> tuple[bytes, list[tuple[bytes, int, bool]]]:
    """The clip's parameter sets and access units (Annex-B, 90 kHz pts, keyframe)."""
    if not clip.exists():
        subprocess.run(
            ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=30",
             "-t", str(SECONDS), "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "4M",
             "-g", "60", "-bf", "0", "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=300)
    units = []
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        sets = annexb_parameter_sets(stream.codec_context.extradata)
        for packet in container.demux(stream):
            data, pos, parts = bytes(packet), 0, list[bytes]()
            while pos + 4 <= len(data):  # MP4 samples: 4-byte lengths → start codes
                (size,) = struct.unpack_from(">I", data, pos)
                parts += (b"\x00\x00\x00\x01", data[pos + 4:pos + 4 + size])
                pos += 4 + size
            if parts and packet.pts is not None and packet.time_base is not None:
                pts = int(packet.pts * packet.time_base * 90_000)
                units.append((b"".join(parts), pts, bool(packet.is_keyframe)))
    return sets, units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", type=Path, default=Path("/tmp/depay.mp4"))
    parser.add_argument("--size", type=int, default=1200, help="RTP payload bytes")
    args = parser.parse_args()
    sets, units = access_units(args.clip)
    packetizer = H264Packetizer(sets, args.size)
    packets: list[memoryview] = []
    for data, pts, key in units:
        payloads = packetizer.packetize(MediaPacket(True, data, pts, Fraction(1, 90_000), key))
        for p in payloads:
            header = struct.pack("!BBHII", 0x80, (0x80 if p.marker else 0) | 96,
                                 len(packets) & 0xFFFF, pts & 0xFFFFFFFF, 0x1234)
            packets.append(memoryview(header + p.prefix + bytes(p.body)))

    depacketizer = H264Depacketizer()
    out: list[AccessUnit] = []
    for packet in packets:
        parsed = parse_rtp(packet)
        assert parsed is not None
        out += depacketizer.push(parsed[4], parsed[3], parsed[1], parsed[2])
    assert len(out) == len(units) and depacketizer.dropped == 0
    for au, (data, pts, key) in zip(out, units, strict=True):
        kept = b"".join(b"\x00\x00\x00\x01" + bytes(n) for n in split_annexb(data)
                        if n[0] & 0x1F not in (7, 8, 9))  # the packetizer's own SPS/PPS
        assert au.timestamp == pts and au.keyframe == key and au.data.endswith(kept)

    runs = []
    for _ in range(7):
        depacketizer = H264Depacketizer()
        push = depacketizer.push
        start = time.process_time()
        for packet in packets:
            parsed = parse_rtp(packet)
            if parsed is not None:
                push(parsed[4], parsed[3], parsed[1], parsed[2])
        runs.append(time.process_time() - start)
    per_packet = [r / len(packets) * 1e6 for r in runs]
    rate = len(packets) / (len(units) / 30)
    print(f"{len(units)} access units, {len(packets)} packets of <= {args.size} bytes "
          f"({rate:.0f}/s), {sum(len(u[0]) for u in units) * 8 / len(units) * 30 / 1e6:.2f}"
          f" Mbit/s")
    print(f"parse_rtp + push: best {min(per_packet):.3f} µs/packet, median "
          f"{statistics.median(per_packet):.3f} µs/packet "
          f"= {statistics.median(per_packet) * rate / 1e4:.3f} % of one core")


if __name__ == "__main__":
    main()
