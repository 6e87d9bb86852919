"""One RTSP client's track: the hub consumer, the client's RTP header, and the send.

The payloads come from the camera's packetizer, shared by every client; here only the
12-byte RTP header (RFC 3550 §5.1) is made — this client's SSRC, sequence numbers, timestamp
offset and payload type. A frame's packets go out in one write (TCP interleaved, RFC 2326
§10.12) or one ``sendto`` each (UDP). A client that cannot keep up (its socket buffer over
``max_buffer``) skips to the next keyframe; it never slows the camera or other clients.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Callable

import structlog

from agent.media.consumer import Consumer, ConsumerClosed
from agent.media.hub import CameraHub
from agent.media.rtp import RTP_HEADER as _HEADER
from agent.media.rtp import RTP_VERSION
from agent.media.stream import MediaPacket

_INTERLEAVED = struct.Struct("!cBHBBHII")  # RFC 2326 §10.12 framing + the RTP header

log = structlog.get_logger(__name__)


class TrackSender:
    """Sends one track of one camera to one client, from PLAY until closed."""

    def __init__(self, hub: CameraHub, video: bool, payload_type: int, *,
                 write: Callable[[list[bytes | memoryview]], None],
                 buffered: Callable[[], int], max_buffer: int,
                 channel: int | None = None) -> None:
        self._hub = hub
        self.video = video
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self._offset = secrets.randbits(32)
        self._write = write  # TCP: one write of all the parts; UDP: each part a datagram
        self._buffered = buffered
        self._max_buffer = max_buffer
        self._channel = channel
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.bytes_sent = 0
        self._behind = False

    def start(self) -> None:
        if self._task is None:
            self._consumer = self._hub.subscribe(self.video, rtp=True)
            self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._consumer is not None:
            self._hub.unsubscribe(self._consumer)
            self._consumer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        consumer.deliver_to(self._live)  # live frames: written within the camera's read
        try:
            while True:  # the replayed GOP, and what was queued meanwhile
                packet, ticks = await consumer.next()
                self._offer(packet, ticks)
        except ConsumerClosed:
            return

    def _live(self, packet: MediaPacket, ticks: int) -> None:
        try:
            self._offer(packet, ticks)
        except Exception:  # never into the camera's read: this client stops, nothing else
            log.error("rtsp_send_failed", camera=self._hub.camera_id, exc_info=True)
            self.close()

    def _offer(self, packet: MediaPacket, ticks: int) -> None:
        if self._behind and (not self.video or packet.keyframe):
            self._behind = self._buffered() > self._max_buffer // 2
        if not self._behind and self._buffered() > self._max_buffer:
            self._behind = True
            log.info("rtsp_client_behind", camera=self._hub.camera_id, ssrc=self.ssrc,
                     action="skipping to the next keyframe")
        if not self._behind:
            self._send(packet, ticks)

    def _send(self, packet: MediaPacket, ticks: int) -> None:
        payloads = packet.rtp
        if not payloads:
            return
        timestamp = (ticks + self._offset) & 0xFFFFFFFF
        parts: list[bytes | memoryview] = []
        append = parts.append
        seq, ssrc, pt, channel = self.seq, self.ssrc, self.payload_type, self._channel
        size = 0
        for prefix, body, marker, length in payloads:
            if channel is not None:  # parts of one stream write
                append(_INTERLEAVED.pack(b"$", channel, 12 + length, RTP_VERSION,
                                         0x80 | pt if marker else pt, seq, timestamp, ssrc))
                if prefix:
                    append(prefix)
                append(body)
            else:  # one datagram each
                append(_HEADER.pack(RTP_VERSION, 0x80 | pt if marker else pt, seq, timestamp,
                                    ssrc) + prefix + body)
            size += 12 + length
            seq = (seq + 1) & 0xFFFF
        self.seq = seq
        self.bytes_sent += size
        self._write(parts)
