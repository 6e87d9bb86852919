"""WebRTC viewers' media sent by the agent, not by aiortc's per-packet sender.

aiortc still negotiates (SDP), connects (ICE), secures (DTLS) and keys SRTP; once DTLS is
up, each track's packets come from the camera's shared packetizer through a hub consumer
and go straight to the socket ICE selected (agent/webrtc/rtpsend.py). aiortc's sender is
kept for its SSRC and RTCP routing but given a track that never yields, so it sends nothing.
The peer may nominate another candidate pair at any time; the send path follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiortc import RTCDtlsTransport, RTCPeerConnection, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
)
from aiortc.sdp import SessionDescription

from agent.beat import until_beat
from agent.media.audio import webrtc_audio_codec
from agent.media.consumer import Consumer, ConsumerClosed
from agent.media.hub import CameraHub
from agent.media.rtp import Payload
from agent.media.stream import MediaPacket
from agent.webrtc import internals
from agent.webrtc.rtpsend import RtpStream, StreamParams, UdpOut
from agent.webrtc.tracks import preferences

log = structlog.get_logger(__name__)

REPORT_INTERVAL = 1.0  # seconds between sender reports (RFC 3550 §6.2, at our low rates)
CONNECT_TIMEOUT = 30.0
#: The share of our packets a viewer lost over a second or more (RtpStream.loss) at which
#: it is treated as unable to keep up: half of what we send is lost on its way.
HUGE_LOSS = 0.5


class SilentTrack(MediaStreamTrack):
    """Given to aiortc's sender so that it never sends media itself."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Any:
        await asyncio.Future()  # until the sender is stopped (its task cancelled)
        raise MediaStreamError


def _section(sdp: str, mid: str | None) -> Any:
    for media in SessionDescription.parse(sdp).media:
        if media.rtp.muxId == mid:
            return media
    raise ValueError(f"no media section with mid {mid!r}")


def stream_params(local: str, answer: str, mid: str | None, clock: int) -> StreamParams:
    """The sent track ``mid``: its SSRCs and CNAME from our SDP, its payload types from the
    answer (ours as a WHEP answerer, the server's as a WHIP offerer): the answer's first
    codec is the one chosen (RFC 3264 §6.1)."""
    media, chosen = _section(local, mid), _section(answer, mid)
    codec = chosen.rtp.codecs[0]
    rtx = next((c for c in chosen.rtp.codecs if c.mimeType.lower().endswith("/rtx")
                and c.parameters.get("apt") == codec.payloadType), None)
    fid = next((g.items for g in media.ssrc_group if g.semantic == "FID"), None)
    main = media.ssrc[0]
    rtx_pt = rtx.payloadType if rtx is not None and fid and len(fid) > 1 else None
    assert codec.payloadType is not None  # every codec of an answer is numbered
    return StreamParams(ssrc=main.ssrc, payload_type=codec.payloadType, clock=clock,
                        cname=main.cname or "agent",
                        rtx_ssrc=int(fid[1]) if fid and rtx_pt is not None else None,
                        rtx_payload_type=rtx_pt)


class DirectTrack:
    """One kind (video or audio) of one camera, for one peer: consumer to socket."""

    def __init__(self, hub: CameraHub, transceiver: RTCRtpTransceiver, video: bool) -> None:
        self._hub = hub
        self.video = video
        self.transceiver = transceiver
        self._consumer: Consumer = hub.subscribe(video=video, rtp=True)
        self.stream: RtpStream | None = None
        self._out: UdpOut | None = None
        self._pair: internals.SelectedPair | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._skip_to_keyframe = False
        self._send_ice: Callable[[bytes], Awaitable[None]] | None = None
        #: Called once if sending fails for good: the owner ends the session (a viewer's
        #: player then sees it end and can reconnect, instead of a frozen picture).
        self.on_failed: Callable[[], None] | None = None
        transceiver.sender.replaceTrack(SilentTrack("video" if video else "audio"))

    @property
    def bytes_sent(self) -> int:
        return self.stream.bytes_sent if self.stream is not None else 0

    def start(self, local: str, answer: str) -> None:
        """After the answer: take over the sender's RTCP; send once DTLS is connected."""
        params = stream_params(local, answer, self.transceiver.mid, self._consumer.clock)
        internals.take_over_rtcp(self.transceiver.sender, self._on_rtcp)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(params)))

    def close(self) -> None:
        self._hub.unsubscribe(self._consumer)
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._pair = None
        if self._out is not None:
            self._out.close()
            self._out = None

    async def _connected(self, dtls: RTCDtlsTransport) -> bool:
        if dtls.state != "connected":
            changed = asyncio.Event()
            dtls.on("statechange", changed.set)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    while dtls.state not in ("connected", "closed", "failed"):
                        changed.clear()
                        await changed.wait()
            except TimeoutError:
                return False
            finally:
                dtls.remove_listener("statechange", changed.set)
        return dtls.state == "connected"

    async def _run(self, params: StreamParams) -> None:
        dtls = self.transceiver.sender.transport
        if not await self._connected(dtls):
            return
        self.stream = RtpStream(params, internals.srtp_session(dtls))
        self._send_ice = send = internals.ice_send(dtls)  # before _switch installs the sink
        self._pair = pair = internals.SelectedPair(dtls)
        pair.moved()
        self._switch(pair, announce=False)
        self._tasks.append(asyncio.get_running_loop().create_task(self._reports(dtls)))
        consumer = self._consumer
        try:  # the replayed GOP, what was queued, and every frame while not on plain UDP
            while True:
                packet, ticks = await consumer.next()
                for datagram in self._send(packet, ticks):
                    await send(datagram)
        except ConsumerClosed:
            return
        except ConnectionError:  # the ICE connection closed under us
            return
        except Exception:  # aioice's path failed otherwise (e.g. a TURN channel refused)
            self._fail()

    def _send(self, packet: MediaPacket, ticks: int) -> list[bytes]:
        """Sends one frame on plain UDP, or returns its datagrams for aioice's path (a TURN
        relay or TCP pair). Never raises: if protecting or sending fails, this viewer stops
        and nothing else (not the camera's read, not the other viewers)."""
        try:
            stream = self.stream
            if stream is None or (payloads := self._payloads(packet)) is None:
                return []
            out = self._path()
            if out is None:
                return stream.frame(payloads, ticks)
            if not stream.send_frame(payloads, ticks, out.send_run) and self.video:
                self._behind("socket_buffer_full")
        except Exception:
            self._fail()
        return []

    def _fail(self) -> None:
        """Sending failed for good (called in an ``except`` block: the error is logged with
        it). This track closes, and its owner is told, once."""
        log.error("webrtc_send_failed", camera=self._hub.camera_id, exc_info=True)
        self.close()
        on_failed, self.on_failed = self.on_failed, None
        if on_failed is not None:
            on_failed()

    def _payloads(self, packet: MediaPacket) -> tuple[Payload, ...] | None:
        """The frame's payloads, or None (skipping to a keyframe, nothing to send)."""
        if self._skip_to_keyframe:
            if not packet.keyframe and self.video:
                return None
            self._skip_to_keyframe = False
        return packet.rtp or None

    def _live(self, packet: MediaPacket, ticks: int) -> None:
        """The consumer's sink while on plain UDP: a live frame sent within the camera's
        read. A pair that moved to TURN or TCP sends this frame through aioice, and the
        next ones through the queue."""
        datagrams = self._send(packet, ticks)
        if datagrams and self._send_ice is not None:
            task = asyncio.get_running_loop().create_task(self._to_ice(datagrams))
            self._tasks.append(task)
            task.add_done_callback(self._forget)

    async def _to_ice(self, datagrams: list[bytes]) -> None:
        assert self._send_ice is not None
        try:
            for datagram in datagrams:
                await self._send_ice(datagram)
        except ConnectionError:  # the ICE connection closed
            return
        except Exception:
            self._fail()

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    def _path(self) -> UdpOut | None:
        """The socket of ICE's selected pair, or None for aioice's own path (not plain UDP, or
        no pair). Looked at for each frame: the peer may nominate another pair at any time,
        and aioice then moves its own traffic there (docs/field-notes.md)."""
        pair = self._pair
        if pair is not None and pair.moved():
            self._switch(pair)
        return self._out

    def _switch(self, pair: internals.SelectedPair, announce: bool = True) -> None:
        """Send to the pair ``pair`` saw last: its socket, or aioice's path (TURN, none)."""
        if self._out is not None:
            self._out.close()
            self._out = None
        selected = pair.udp()
        if selected is not None:
            self._out = UdpOut(*selected)
        self._consumer.deliver_to(self._live if self._out is not None else None)
        if announce and pair.pair is not None:  # None: the ICE connection closed
            local, remote = pair.kinds()
            log.info("webrtc_pair_switched", camera=self._hub.camera_id,
                     kind="video" if self.video else "audio",
                     path="udp" if self._out is not None else "ice",
                     local=local, remote=remote)

    def _behind(self, reason: str) -> None:
        """Send nothing more until the next keyframe: the viewer cannot take what we send."""
        if not self._skip_to_keyframe:
            self._skip_to_keyframe = True
            log.info("webrtc_viewer_behind", camera=self._hub.camera_id, reason=reason,
                     action="skipping to the next keyframe")

    def _write(self, datagrams: list[bytes]) -> None:
        if datagrams and (out := self._path()) is not None:
            out.send(datagrams)

    async def _reports(self, dtls: RTCDtlsTransport) -> None:
        while True:
            await asyncio.sleep(until_beat(REPORT_INTERVAL))  # every viewer's at once
            if self.stream is None or dtls.state != "connected":
                continue
            try:
                report = self.stream.sender_report()
                if report is None:
                    continue
                if self._path() is not None:
                    self._write([report])
                else:
                    await internals.ice_send(dtls)(report)
            except ConnectionError:  # the ICE connection closed: the session ends
                continue
            except Exception:
                self._fail()
                return

    async def _on_rtcp(self, packet: Any) -> None:
        """RTCP aiortc routed to this track's SSRC (already parsed and checked by aiortc)."""
        stream = self.stream
        if stream is None:
            return
        try:
            if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
                for r in packet.reports[:4]:
                    if r.ssrc == stream.params.ssrc:
                        stream.report(r.fraction_lost, r.packets_lost, r.jitter, r.lsr, r.dlsr)
                        if not self.video:
                            continue
                        lost = stream.loss(r.highest_sequence, r.packets_lost, time.monotonic())
                        if lost is not None and lost >= HUGE_LOSS:
                            self._behind("loss")
            elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                self._write(stream.retransmit(packet.lost))
            elif (isinstance(packet, RtcpPsfbPacket) and self.video
                  and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR)
                  and stream.keyframe_wanted(time.monotonic())):
                self._hub.keyframe_wanted(self._consumer)
        except Exception:  # never an exception on the loop from what a peer sends
            log.warning("webrtc_rtcp_failed", camera=self._hub.camera_id, exc_info=True)


def add_direct_tracks(pc: RTCPeerConnection, hub: CameraHub, audio: bool) -> list[DirectTrack]:
    """Like tracks.add_camera_tracks, sent by the agent: the camera's video (H.264, or
    H.265) and, if ``audio`` and the camera has sound, audio in the codec it arrives in."""
    assert hub.info is not None
    video = pc.addTransceiver("video", direction="sendonly")
    if hub.info.codec == "hevc":
        internals.register_h265()
        video.setCodecPreferences(preferences("video", "H265"))
    else:
        video.setCodecPreferences(preferences("video", "H264"))
    tracks = [DirectTrack(hub, video, video=True)]
    codec = webrtc_audio_codec(hub.info.audio.codec) if hub.info.audio else None
    if audio and codec:
        sound = pc.addTransceiver("audio", direction="sendonly")
        sound.setCodecPreferences(preferences("audio", codec))
        tracks.append(DirectTrack(hub, sound, video=False))
    return tracks
