"""Cost per frame of one viewer's send, step by step, on loopback (no agent, no network).

    .venv/bin/python -m tests.bench.bench_send [--frames 3000]

A 4 Mbit/s 30 fps frame is ~16.7 kB: 14 RTP packets of the shared packetizer's payloads.
Per viewer the agent adds the RTP header, SRTP (pylibsrtp, AES-CM-128 + HMAC-SHA1-80) and the
send. Printed: µs per frame and syscalls per frame for one ``sendto`` per packet (what
aiortc/aioice do, minus their Python layers), for UDP GSO runs (one ``sendmsg``) of packets
copied out as bytes, for the agent's own path (protected in place in one buffer, the socket
given views of it: ``RtpStream.send_frame``), and what
looking at ICE's selected pair once a frame adds (``SelectedPair.moved``, on a real aioice
connection through aiortc's transports).
"""

from __future__ import annotations

import argparse
import socket
import time

import pylibsrtp
from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport

from agent.media.rtp import Payload
from agent.webrtc.internals import SelectedPair
from agent.webrtc.rtpsend import RtpStream, StreamParams, UdpOut
from tests.unit.test_webrtc_send import CountingSocket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=3000)
    args = parser.parse_args()
    policy = pylibsrtp.Policy(key=bytes(range(30)), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    stream = RtpStream(StreamParams(1, 102, 90_000, "bench"), pylibsrtp.Session(policy))
    data = memoryview(bytes(16_700))
    payloads = tuple(Payload(b"\x7c\x05", data[i:i + 1198], i + 1198 >= len(data),
                             2 + len(data[i:i + 1198])) for i in range(0, len(data), 1198))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # overflow: drops, cheap
    sock = CountingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    print(f"{len(payloads)} packets a frame, {args.frames} frames")
    start = time.perf_counter()
    for n in range(args.frames):
        stream.frame(payloads, n * 3000)
    protect = (time.perf_counter() - start) / args.frames * 1e6
    print(f"RTP headers + SRTP, as bytes : {protect:6.1f} µs a frame")
    out = UdpOut(sock, sink.getsockname())
    for gso in (False, True):
        out.gso = gso
        sock.calls = 0
        start = time.perf_counter()
        for n in range(args.frames):
            out.send(stream.frame(payloads, n * 3000))
        total = (time.perf_counter() - start) / args.frames * 1e6
        print(f"+ send, {'UDP GSO sendmsg ' if gso else 'sendto per packet'}: {total:6.1f} µs a "
              f"frame ({sock.calls / args.frames:.1f} syscalls)")
    sock.calls = 0
    start = time.perf_counter()
    for n in range(args.frames):
        stream.send_frame(payloads, n * 3000, out.send_run)
    gso_total = (time.perf_counter() - start) / args.frames * 1e6
    print(f"in place, GSO (the agent's) : {gso_total:6.1f} µs a frame "
          f"({sock.calls / args.frames:.1f} syscalls)")
    dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer(iceServers=[])),
                            [RTCCertificate.generateCertificate()])
    pair = SelectedPair(dtls)
    pair.moved()
    rounds = 1_000_000
    start = time.perf_counter()
    for _ in range(rounds):
        pair.moved()
    check = (time.perf_counter() - start) / rounds * 1e9
    print(f"follow ICE's pair (moved())  : {check:6.0f} ns a frame "
          f"({check / 1e3 / gso_total * 100:.2f} % of the GSO send)")


if __name__ == "__main__":
    main()
