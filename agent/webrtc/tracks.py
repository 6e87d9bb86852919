"""Passthrough tracks: encoded packets from a hub consumer, sent by aiortc without encoding.

aiortc packs an ``av.Packet`` returned by ``recv()`` as-is (H.264 split into FU-A, G.711 and
Opus as they are); ``pts`` and ``time_base`` must be set on every packet (docs/field-notes.md).
"""

from __future__ import annotations

import av
from aiortc import RTCPeerConnection, RTCRtpCodecCapability, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.media.audio import webrtc_audio_codec
from agent.media.consumer import Consumer, ConsumerClosed
from agent.media.hub import CameraHub


class HubTrack(MediaStreamTrack):
    """One kind (video or audio) of one camera, for one peer."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__()
        self.kind = "video" if consumer.video else "audio"
        self._consumer = consumer
        self.bytes_sent = 0

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
        return out


def preferences(kind: str, name: str) -> list[RTCRtpCodecCapability]:
    codecs = RTCRtpSender.getCapabilities(kind).codecs
    chosen = [c for c in codecs if c.mimeType.lower() == f"{kind}/{name}".lower()]
    if kind == "video":
        chosen += [c for c in codecs if c.mimeType.lower() == "video/rtx"]
    return chosen


def add_camera_tracks(pc: RTCPeerConnection, hub: CameraHub, audio: bool) -> list[HubTrack]:
    """Sendonly transceivers fed by ``hub``: H.264 video, and (if ``audio`` and the camera has
    sound) audio in exactly the codec it arrives in. Preferences are set before any
    description is applied (otherwise aiortc negotiates VP8 / Opus: docs/field-notes.md)."""
    assert hub.info is not None
    tracks = []
    video = pc.addTransceiver("video", direction="sendonly")
    video.setCodecPreferences(preferences("video", "H264"))
    tracks.append(HubTrack(hub.subscribe(video=True)))
    video.sender.replaceTrack(tracks[-1])
    codec = webrtc_audio_codec(hub.info.audio.codec) if hub.info.audio else None
    if audio and codec:
        sound = pc.addTransceiver("audio", direction="sendonly")
        sound.setCodecPreferences(preferences("audio", codec))
        tracks.append(HubTrack(hub.subscribe(video=False)))
        sound.sender.replaceTrack(tracks[-1])
    return tracks
