"""A viewer's WebRTC session: answer a (non-trickle) offer with the camera's tracks.

Codec preferences are forced before ``setRemoteDescription`` (otherwise aiortc negotiates VP8
and sends H.264 bytes labelled VP8, see docs/field-notes.md): the camera's codec for video
(H.264, or H.265 on the agent's send path with the format chosen in agent/webrtc/h265.py),
and for audio exactly the codec the camera's audio arrives in (PCMU, PCMA, or Opus after
transcoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCSessionDescription,
)

from agent.media.hub import CameraHub
from agent.webrtc import internals
from agent.webrtc.direct import DirectTrack, add_direct_tracks
from agent.webrtc.offer import OfferError, check_offer
from agent.webrtc.rtpsend import ReceptionStats
from agent.webrtc.tracks import HubTrack, add_camera_tracks


def _explain(exc: Exception) -> str:
    text = str(exc)
    if "video description send parameters" in text:
        return "the offer does not accept the camera's video codec (H.264, or H.265)"
    if "audio description send parameters" in text:
        return "the offer does not accept the camera's audio codec: offer PCMU, PCMA and Opus"
    return f"the SDP offer cannot be used: {text or type(exc).__name__}"


class ViewerSession:
    """One peer connection fed by a camera hub; closing it releases the camera."""

    def __init__(self, camera_id: str, hub: CameraHub, pc: RTCPeerConnection) -> None:
        self.id = secrets.token_urlsafe(18)
        self.camera_id = camera_id
        self._hub = hub
        self.pc = pc
        self.tracks: list[HubTrack] | list[DirectTrack] = []
        self._closed = asyncio.Event()
        self._ending: asyncio.Task[None] | None = None  # the loop keeps only a weak reference
        self.on_closed: Callable[[ViewerSession], None] | None = None

    @classmethod
    async def answer(
        cls, camera_id: str, hub: CameraHub, offer: str, configuration: RTCConfiguration,
        direct: bool = False, video_codecs: list[RTCRtpCodecParameters] | None = None,
    ) -> tuple[ViewerSession, str]:
        """Build the session and its SDP answer (ICE gathered: no trickle needed). ``direct``:
        the agent sends the media itself (agent/webrtc/direct.py), else aiortc does.
        ``video_codecs``: the answer's video formats, chosen by the caller (H.265)."""
        check_offer(offer)
        assert hub.info is not None
        pc = RTCPeerConnection(configuration)
        session = cls(camera_id, hub, pc)
        try:
            audio = "\nm=audio " in offer.replace("\r\n", "\n")
            session.tracks = (add_direct_tracks if direct else add_camera_tracks)(
                pc, hub, audio=audio)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            except Exception as exc:  # aiortc raises assorted errors on bad SDP
                raise OfferError(_explain(exc)) from None
            if video_codecs:  # only the agent's send path sends H.265
                video = session.tracks[0]
                assert isinstance(video, DirectTrack) and video.video
                internals.set_codecs(video.transceiver, video_codecs)
            await pc.setLocalDescription(await pc.createAnswer())
            for track in session.tracks:
                if isinstance(track, DirectTrack):
                    track.on_failed = session._end
                    track.start(pc.localDescription.sdp, pc.localDescription.sdp)
        except BaseException:
            await session.close()
            raise

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await session.close()

        return session, pc.localDescription.sdp

    def _end(self) -> None:
        """Close soon (from a callback that cannot await): a track could not send."""
        if not self._closed.is_set() and self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self.close())

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes_sent for t in self.tracks)

    @property
    def reception(self) -> ReceptionStats | None:
        """What the viewer's receiver reports say about its video (the agent's send path)."""
        for track in self.tracks:
            if isinstance(track, DirectTrack) and track.video and track.stream is not None:
                return track.stream.stats
        return None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def close(self) -> None:
        """End media at once, release the camera, close the peer connection. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        for track in self.tracks:
            if isinstance(track, DirectTrack):
                track.close()  # no packet is sent after this
            else:
                self._hub.unsubscribe(track._consumer)
        with contextlib.suppress(Exception):
            await self.pc.close()
        if self.on_closed is not None:
            self.on_closed(self)
