"""The floor under the media benchmarks: what the least Python can do costs on this machine.

A bare asyncio process is woken for each frame of a 30 fps, 4 Mbit/s stream arriving over
TCP on loopback (16 kB a frame, as a camera's RTSP-over-TCP stream arrives), reads it, and
optionally sends it on as 14 datagrams of 1,200 bytes with one UDP GSO ``sendmsg`` to a
process that only drains them: the agent's per-frame I/O with one viewer, and nothing else
(no RTP, no SRTP, no other timers). Its CPU, measured like the agent's, says what the
machine charges for waking a Python process and moving the bytes, which varies from day to
day on a shared VM by more than the changes the benchmarks are meant to show
(docs/field-notes.md); printed beside the agent's figures, it makes them comparable.

    .venv/bin/python -m tests.bench.floor
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable

from tests.support.netns import free_port

FPS = 30
FRAME = 16_000  # bytes: 4 Mbit/s at 30 fps
SEGMENT = 1_200
UDP_SEGMENT = 103  # linux/udp.h


def camera(port: int) -> None:
    """A frame's bytes every 1/FPS s, in one write, as the GStreamer camera sends them."""
    for _ in range(100):  # the reader may still be starting
        try:
            out = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    else:
        sys.exit("floor: the reader never listened")
    frame, due = b"\0" * FRAME, time.monotonic()
    while True:
        due += 1 / FPS
        out.sendall(frame)
        time.sleep(max(0.0, due - time.monotonic()))


def sink(port: int) -> None:
    inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbox.bind(("127.0.0.1", port))
    while True:
        inbox.recv(2048)


async def reader(port: int, sink_port: int, send: bool) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    conn, _ = await loop.sock_accept(listener)
    conn.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setblocking(False)
    datagrams = bytearray(14 * SEGMENT)
    gso = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", SEGMENT))]

    def readable() -> None:
        conn.recv(65536)
        if send:
            out.sendmsg([datagrams], gso, 0, ("127.0.0.1", sink_port))

    loop.add_reader(conn.fileno(), readable)
    await asyncio.Future()


def floor(send: bool, window: float, windows: int,
          cpu_seconds: Callable[[int], float]) -> list[float]:
    """The reader's CPU (% of one core) over ``windows`` windows of ``window`` s."""
    port, sink_port = free_port(), free_port()
    me = [sys.executable, "-m", "tests.bench.floor"]
    procs = [subprocess.Popen([*me, "sink", str(sink_port)]),
             subprocess.Popen([*me, "reader", str(port), str(sink_port), str(int(send))])]
    try:
        procs.append(subprocess.Popen([*me, "camera", str(port)]))
        time.sleep(3)  # connected (the camera retries until the reader listens)
        pid, loads = procs[1].pid, []
        for _ in range(windows):
            start_cpu, start = cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            loads.append((cpu_seconds(pid) - start_cpu) / (time.monotonic() - start) * 100)
        if any(proc.poll() is not None for proc in procs):  # its figures would mean nothing
            sys.exit("floor: a process of the floor ended early")
        return loads
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def report(window: float, windows: int, cpu_seconds: Callable[[int], float]) -> None:
    for send, what in ((False, "read each frame"), (True, "read + one GSO send")):
        loads = floor(send, window, windows, cpu_seconds)
        print(f"floor, bare asyncio ({what:19s}): min {min(loads):5.2f}  "
              f"median {statistics.median(loads):5.2f}  max {max(loads):5.2f}", flush=True)


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "camera":
        camera(int(sys.argv[2]))
    elif role == "sink":
        sink(int(sys.argv[2]))
    elif role == "reader":
        asyncio.run(reader(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
    else:
        from tests.bench.bench_media import cpu_seconds
        report(10.0, 3, cpu_seconds)


if __name__ == "__main__":
    main()
