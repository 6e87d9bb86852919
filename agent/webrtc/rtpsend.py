"""One WebRTC viewer's RTP stream: its headers, SRTP, RTCP, and few syscalls per frame.

The payloads come from the camera's packetizer (agent/media/rtp.py), made once for every
consumer; here only what differs per viewer is done: the 12-byte RTP header (RFC 3550 §5.1:
SSRC, sequence number, timestamp offset, payload type, marker), SRTP protection with this
viewer's keys, and the send. A frame's packets leave in as few ``sendmsg`` calls as Linux
allows: equal-size datagrams in one call with UDP GSO (``UDP_SEGMENT``); the SRTP tag is a
fixed size, so the equal-size FU-A payloads stay equal once protected. They are written
(header, then payload) into one buffer and protected there by libsrtp in place, and the
socket is given views of it: no object per packet and no copy beyond the one into the buffer.

RTCP for the media: sender reports every second (RFC 3550 §6.4.1; browsers use them for
A/V sync); receiver reports give loss (judged over a second or more, from their cumulative
counters), jitter and round-trip time; NACK (RFC 4585 §6.2.1) is answered from the viewer's
history of the last ~1 s of frames (references to the shared payloads, re-protected when
resent, as RTX per RFC 4588 when negotiated); PLI/FIR (RFC 4585 §6.3.1, RFC 5104 §4.3.1)
replays the camera's cached GOP from its keyframe. Work per RTCP packet is bounded whatever
the peer sends.
"""

from __future__ import annotations

import errno
import functools
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pylibsrtp

from agent.media.rtp import RTP_HEADER as _HEADER
from agent.media.rtp import RTP_VERSION, Payload
from agent.webrtc import internals
from agent.webrtc.speedups import ntp_time

UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size, per sendmsg
GSO_MAX_SEGMENTS = 64  # linux/udp.h UDP_MAX_SEGMENTS (older kernels)
GSO_MAX_BYTES = 65000  # under the 65507-byte UDP payload limit
TRAILER_ROOM = 144  # libsrtp's SRTP_MAX_TRAILER_LEN: what protection may write after a packet
SCRATCH_BYTES = 1 << 17  # a full GSO run fits; a payload that does not is refused
HISTORY_FRAMES = 96  # ~1 s of video at 30 fps plus audio frames riding along
NACK_MAX = 64  # sequence numbers looked at per NACK packet: bounded work per viewer
KEYFRAME_INTERVAL = 1.0  # at most one GOP replay per second per viewer (PLI floods)
LOSS_WINDOW = 1.0  # a viewer's loss is judged over at least this many seconds...
LOSS_WINDOW_PACKETS = 20  # ...and at least this many of our packets
LOSS_WINDOW_MAX = 10.0  # reports that stop longer than this start a new window, unjudged
RTCP_SR = 200
_SEGMENT = struct.Struct("H").pack  # the UDP_SEGMENT control message's value
_Datagram = TypeVar("_Datagram", bytes, memoryview)


#: Takes one run of protected packets (equal sizes, the last possibly shorter) and its
#: segment size; False if they could not be sent (the socket buffer is full). The views are
#: of the shared buffer: valid during the call only (what is kept must be copied).
Emit = Callable[[Sequence[memoryview], int], bool]


class _Scratch:
    """The buffer where a frame's packets are protected in place, shared by every stream in
    the process: each frame is written and emitted within one call on the event loop's thread
    (nothing awaits in between), and what is kept beyond the call is copied out."""

    def __init__(self, ffi: Any) -> None:
        self.cdata = ffi.new("unsigned char[]", SCRATCH_BYTES)  # malloc'd: aligned
        self.view = memoryview(ffi.buffer(self.cdata))
        self.length = ffi.new("int *")


@functools.cache
def _shared_scratch(ffi: Any) -> _Scratch:
    return _Scratch(ffi)


@dataclass(frozen=True, slots=True)
class StreamParams:
    """What the SDP answer fixed for one sent track."""

    ssrc: int
    payload_type: int
    clock: int
    cname: str
    rtx_ssrc: int | None = None
    rtx_payload_type: int | None = None


@dataclass(slots=True)
class ReceptionStats:
    """The viewer's latest receiver report about this track (RFC 3550 §6.4.1)."""

    fraction_lost: float = 0.0
    packets_lost: int = 0
    jitter_seconds: float = 0.0
    rtt_seconds: float | None = None
    retransmitted: int = 0
    keyframe_requests: int = 0


class RtpStream:
    """Sans-I/O: payloads in, protected RTP/RTCP datagrams out, for one viewer's track."""

    def __init__(self, params: StreamParams, srtp: Any) -> None:
        self.params = params
        self._srtp = srtp
        ffi, self._ctx, self._protect = internals.srtp_in_place(srtp)
        self._scratch = _shared_scratch(ffi)
        self.seq = secrets.randbits(16)
        self._rtx_seq = secrets.randbits(16)
        self._offset = secrets.randbits(32)
        # (first sequence number, timestamp, payloads) per frame: references, no copies
        self._history: deque[tuple[int, int, tuple[Payload, ...]]] = deque(
            maxlen=HISTORY_FRAMES)
        self.packets = 0
        self.octets = 0  # payload octets (RFC 3550 §6.4.1 sender's octet count)
        self.bytes_sent = 0  # RTP bytes: headers and payloads, before SRTP
        self._last_ts: int | None = None
        self._last_wall = 0.0
        self._last_sr = 0  # middle 32 bits of the last SR's NTP timestamp
        self.stats = ReceptionStats()
        self._last_keyframe_request = 0.0
        # (time, highest sequence number (16 bits), cumulative lost) where the window began
        self._loss_start: tuple[float, int, int] | None = None

    def send_frame(self, payloads: tuple[Payload, ...], ticks: int, emit: Emit) -> bool:
        """Protect one frame's packets, in order, and hand them to ``emit`` in runs one
        ``UDP_SEGMENT`` sendmsg can carry (``gso_batches``). False if ``emit`` refused a
        run: the rest of the frame is not sent (its sequence numbers are used all the same,
        so the history still matches what a NACK asks for) nor counted."""
        timestamp = (ticks + self._offset) & 0xFFFFFFFF
        seq = self.seq
        self._history.append((seq, timestamp, payloads))
        self.seq, self._last_ts, self._last_wall = \
            (seq + len(payloads)) & 0xFFFF, timestamp, time.time()
        counted = 0  # payloads sent and counted (RFC 3550 §6.4.1's sender counts; audit bytes)
        for packets in self._protected(payloads, seq, timestamp, self.params.payload_type,
                                       self.params.ssrc):
            for run in gso_batches(packets):
                if not emit(run, len(run[0])):
                    return False
                octets = sum(p.size for p in payloads[counted:counted + len(run)])
                counted += len(run)
                self.packets += len(run)
                self.octets += octets
                self.bytes_sent += octets + 12 * len(run)
        return True

    def _protected(self, payloads: tuple[Payload, ...], seq: int, timestamp: int,
                   pt: int, ssrc: int) -> Iterator[list[memoryview]]:
        """The packets, protected in place in the shared buffer, as views of it: a list each
        time the buffer is full, and the rest at the end (each valid until the next)."""
        view, cdata, length = self._scratch.view, self._scratch.cdata, self._scratch.length
        ctx, protect, pack = self._ctx, self._protect, _HEADER.pack_into
        packets: list[memoryview] = []
        at = 0
        for prefix, body, marker, n in payloads:
            end = at + 12 + n
            if end + TRAILER_ROOM > SCRATCH_BYTES:  # the buffer is full: send, start over
                if packets:
                    yield packets
                packets, at, end = [], 0, 12 + n
                if end + TRAILER_ROOM > SCRATCH_BYTES:  # its tag would not fit either
                    raise ValueError(f"an RTP payload of {n} bytes is too large")
            pack(view, at, RTP_VERSION, 0x80 | pt if marker else pt, seq, timestamp, ssrc)
            if prefix:
                split = at + 12 + len(prefix)
                view[at + 12:split] = prefix
                view[split:end] = body
            else:
                view[at + 12:end] = body
            length[0] = end - at
            status = protect(ctx, cdata + at, length)
            if status:
                raise pylibsrtp.Error(f"srtp_protect failed: status {status}")
            packets.append(view[at:at + length[0]])
            at = (at + length[0] + 3) & ~3  # libsrtp wants each packet on a 32-bit boundary
            seq = (seq + 1) & 0xFFFF
        if packets:
            yield packets

    def frame(self, payloads: tuple[Payload, ...], ticks: int) -> list[bytes]:
        """One frame's packets, protected and in order, as datagrams of their own (for a
        path that keeps them: aioice's, to a TURN relay or over TCP)."""
        out: list[bytes] = []

        def keep(run: Sequence[memoryview], segment: int) -> bool:
            out.extend(map(bytes, run))
            return True

        self.send_frame(payloads, ticks, keep)
        return out

    def retransmit(self, lost: list[int]) -> list[bytes]:
        """The NACKed packets still in the history (at most NACK_MAX looked at)."""
        out = []
        for seq in lost[:NACK_MAX]:
            for first, timestamp, payloads in self._history:
                index = (seq - first) & 0xFFFF
                if index < len(payloads):
                    out.append(self._resend(seq, timestamp, payloads[index]))
                    break
        self.stats.retransmitted += len(out)
        return out

    def _resend(self, seq: int, timestamp: int, payload: Payload) -> bytes:
        p = self.params
        if p.rtx_ssrc is not None and p.rtx_payload_type is not None:  # RFC 4588 §4
            pt, ssrc, out_seq = p.rtx_payload_type, p.rtx_ssrc, self._rtx_seq
            self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
            prefix, body, marker, size = payload
            payload = Payload(struct.pack("!H", seq) + prefix, body, marker, size + 2)
        else:
            pt, ssrc, out_seq = p.payload_type, p.ssrc, seq
        (packet,), = self._protected((payload,), out_seq, timestamp, pt, ssrc)
        return bytes(packet)

    def keyframe_wanted(self, now: float) -> bool:
        """A PLI/FIR arrived: True if this viewer may have a keyframe now (rate-limited)."""
        self.stats.keyframe_requests += 1
        if now - self._last_keyframe_request < KEYFRAME_INTERVAL:
            return False
        self._last_keyframe_request = now
        return True

    def sender_report(self) -> bytes | None:
        """SR + SDES CNAME (RFC 3550 §6.4.1, §6.5.1), protected; None before any packet."""
        if self._last_ts is None:
            return None
        now = ntp_time()
        wall = (now >> 32) - 2_208_988_800 + (now & 0xFFFFFFFF) / 4_294_967_296
        rtp_now = (self._last_ts + int((wall - self._last_wall) * self.params.clock)) \
            & 0xFFFFFFFF
        ssrc = self.params.ssrc
        sr = struct.pack("!BBHIQIII", 0x80, RTCP_SR, 6, ssrc, now, rtp_now,
                         self.packets & 0xFFFFFFFF, self.octets & 0xFFFFFFFF)
        self._last_sr = (now >> 16) & 0xFFFFFFFF
        cname = self.params.cname.encode()[:255]
        item = bytes([1, len(cname)]) + cname + b"\x00"  # CNAME item, then the end item
        item += b"\x00" * (-len(item) % 4)
        sdes = struct.pack("!BBHI", 0x81, 202, (4 + len(item)) // 4, ssrc) + item
        return bytes(self._srtp.protect_rtcp(sr + sdes))

    def report(self, fraction_lost: int, packets_lost: int, jitter: int, lsr: int,
               dlsr: int) -> None:
        """A reception report block about this track (RFC 3550 §6.4.1)."""
        s = self.stats
        s.fraction_lost = fraction_lost / 256
        s.packets_lost = packets_lost
        s.jitter_seconds = jitter / self.params.clock
        if lsr and lsr == self._last_sr:  # §6.4.1: RTT = A - LSR - DLSR, in 1/65536 s
            arrival = (ntp_time() >> 16) & 0xFFFFFFFF
            rtt = ((arrival - lsr - dlsr) & 0xFFFFFFFF) / 65536
            if rtt < 60:
                s.rtt_seconds = rtt

    def loss(self, highest_sequence: int, packets_lost: int, now: float) -> float | None:
        """The share of our packets lost since the last judgement, from a report's cumulative
        counters (RFC 3550 §6.4.1, A.3), once LOSS_WINDOW seconds and LOSS_WINDOW_PACKETS
        packets have passed; None until then. Not a report's own fraction lost: libwebrtc
        sends a report with every NACK, whose fraction then covers two or three packets."""
        high = highest_sequence & 0xFFFF  # aiortc reports the 16-bit number, not extended
        start = self._loss_start
        if start is not None and now - start[0] <= LOSS_WINDOW_MAX:
            began, first, lost_before = start
            expected = (high - first) & 0xFFFF
            if expected >= 0x8000 or now - began < LOSS_WINDOW or expected < LOSS_WINDOW_PACKETS:
                return None  # an older report (reordered), or the window is not full yet
            self._loss_start = (now, high, packets_lost)
            return min(1.0, max(0, packets_lost - lost_before) / expected)
        self._loss_start = (now, high, packets_lost)
        return None


def gso_batches(packets: Sequence[_Datagram]) -> Iterator[list[_Datagram]]:
    """Runs of packets one ``UDP_SEGMENT`` sendmsg can carry: equal sizes, the last of a
    run possibly shorter (the kernel cuts the buffer every ``len(run[0])`` bytes)."""
    run: list[_Datagram] = []
    size = total = 0
    for packet in packets:
        n = len(packet)
        if run and (n > size or len(run) == GSO_MAX_SEGMENTS or total + n > GSO_MAX_BYTES
                    or len(run[-1]) != size):
            yield run
            run = []
        if not run:
            size, total = n, 0
        run.append(packet)
        total += n
    if run:
        yield run


class UdpOut:
    """Writes datagrams to ICE's selected UDP socket: GSO runs, one syscall each."""

    def __init__(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.sock = sock
        self.address = address
        self.gso = hasattr(socket, "SOL_UDP")

    def send(self, packets: list[bytes]) -> bool:
        """False when the socket buffer is full (the viewer is behind: the rest is dropped)."""
        return all(self.send_run(run, len(run[0])) for run in gso_batches(packets))

    def send_run(self, run: Sequence[memoryview | bytes], segment: int) -> bool:
        """One run of equal-size datagrams (the last possibly shorter) in one syscall; False
        when the socket buffer is full."""
        try:
            if len(run) == 1:
                self.sock.sendto(run[0], self.address)
            elif self.gso:
                self.sock.sendmsg(run, [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT(segment))], 0,
                                  self.address)
            else:
                for packet in run:
                    self.sock.sendto(packet, self.address)
        except BlockingIOError:
            return False
        except OSError as exc:
            if self.gso and exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT,
                                          errno.EOPNOTSUPP):
                self.gso = False  # no GSO on this path (device or kernel): one by one
                return self.send_run(run, segment)
            if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                return False
            # the peer's port is gone (ICMP) or the network changed: drop, ICE decides
        return True

    def close(self) -> None:
        self.sock.close()
