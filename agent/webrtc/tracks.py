"""Passthrough tracks: encoded packets from a hub consumer, sent by aiortc without encoding.

aiortc packs an ``av.Packet`` returned by ``recv()`` as-is (H.264 split into FU-A, G.711 and
Opus as they are); ``pts`` and ``time_base`` must be set on every packet (FIELD-NOTES).
"""

from __future__ import annotations

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.media.consumer import Consumer, ConsumerClosed


class HubTrack(MediaStreamTrack):
    """One kind (video or audio) of one camera, for one peer."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__()
        self.kind = "video" if consumer.video else "audio"
        self._consumer = consumer
        self.bytes_sent = 0
        self.packets_sent = 0

    async def recv(self) -> av.Packet:  # type: ignore[type-arg]
        try:
            packet, ts = await self._consumer.next()
        except ConsumerClosed:
            self.stop()
            raise MediaStreamError from None
        out = av.Packet(packet.data)
        out.pts = ts
        out.time_base = self._consumer.time_base
        self.bytes_sent += len(packet.data)
        self.packets_sent += 1
        return out
