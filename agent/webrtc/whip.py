"""WHIP publishing (RFC 9725): send a camera to a relay (or any WHIP server).

The tracks are the same as LAN viewers get (the agent's send path, or aiortc's), from the
same single camera pull. ICE is gathered before the offer is sent (no trickle); redirects are
followed; the session ends with a DELETE on the resource the server named.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from urllib.parse import urljoin

import aiohttp
import structlog
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from agent import __version__
from agent.beat import until_beat
from agent.media.hub import CameraHub
from agent.webrtc.direct import DirectTrack, add_direct_tracks
from agent.webrtc.tracks import HubTrack, add_camera_tracks

log = structlog.get_logger(__name__)

MAX_REDIRECTS = 3
USER_AGENT = f"therelay-agent/{__version__}"
#: A connected peer that sends nothing (no RTCP receiver report, no NACK, no DTLS record)
#: for this long, or for 2x the longest gap seen so far if larger, is taken for dead: a
#: crashed WHIP server sends no DTLS alert, and ICE consent (RFC 7675 §5.1) would only
#: expire after 30 s. WebRTC receivers (libwebrtc, Pion, aiortc) send RTCP receiver
#: reports about every second (RFC 3550 §6.2 leaves the interval to the profile; aiortc
#: waits 0.5–1.5 s), so 2.5 s is two missed reports or more; a peer that reports more
#: sparsely widens the window.
SILENT_PEER = 2.5
WATCH_EVERY = 0.25
_LINK = re.compile(r'<([^>]+)>\s*;([^,]*rel="?ice-server"?[^,]*)')
_PARAM = re.compile(r'(\w[\w-]*)="([^"]*)"')


#: Relay viewers are browsers anywhere; many cannot decode H.265, and the relay protocol
#: (docs/relay-protocol.md) carries H.264: an H.265 camera is not published.
WHIP_H265 = ("the camera sends H.265 (HEVC) video, which is not published to the relay "
             "(relay viewers need H.264): set the camera's substream to H.264 and use it for "
             "this camera; LAN viewers can watch H.265 over RTSP, HLS, or WebRTC where the "
             "browser offers H.265")


class WhipError(Exception):
    """The WHIP server refused or failed the session; ``code`` goes to publish.status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def ice_servers_from_links(headers: list[str]) -> list[RTCIceServer]:
    """RFC 9725 §4.6: ``Link: <turn:…>; rel="ice-server"; username=…; credential=…``."""
    servers = []
    for header in headers:
        for url, params in _LINK.findall(header):
            fields = dict(_PARAM.findall(params))
            servers.append(RTCIceServer(urls=[url], username=fields.get("username"),
                                        credential=fields.get("credential")))
    return servers


class WhipPublisher:
    def __init__(self, hub: CameraHub, url: str, bearer: str,
                 configuration: RTCConfiguration, direct: bool = True) -> None:
        """``direct``: the agent sends the media (agent/webrtc/direct.py), else aiortc."""
        self._hub = hub
        self._url = url
        self._bearer = bearer
        self._configuration = configuration
        self.pc: RTCPeerConnection | None = None
        self._direct = direct
        self.tracks: list[HubTrack] | list[DirectTrack] = []
        self.resource: str | None = None
        self.connected = asyncio.Event()
        self.failed = asyncio.Event()
        self.failure: str | None = None  # why ``failed`` was set
        self._watch: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        """Offer, POST, answer. Raises WhipError with a code for publish.status."""
        holder = self._hub.subscribe()  # starts the pull if the camera is idle
        try:
            if not await self._hub.ready(timeout):
                raise WhipError("camera_offline", self._hub.status.error or "camera not ready")
            if (refusal := self._hub.webrtc_refusal()) is not None:
                raise WhipError("unsupported_codec", refusal)
            if self._hub.status.codec == "hevc":
                log.warning("whip_h265_not_published", camera=self._hub.camera_id,
                            fix="set the camera's substream to H.264 for the relay")
                raise WhipError("unsupported_codec", WHIP_H265)
        finally:
            self._hub.unsubscribe(holder)  # the tracks below keep it running
        assert self._hub.info is not None
        pc = self.pc = RTCPeerConnection(self._configuration)
        self.tracks = (add_direct_tracks if self._direct else add_camera_tracks)(
            pc, self._hub, audio=True)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                self.connected.set()
                if self._watch is None:
                    self._watch = asyncio.get_running_loop().create_task(self._watch_peer(pc))
            elif pc.connectionState in ("failed", "closed"):
                self._fail(f"ICE/DTLS {pc.connectionState}")

        await pc.setLocalDescription(await pc.createOffer())
        answer, location = await self._post(pc.localDescription.sdp, timeout)
        self.resource = location
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        for track in self.tracks:
            if isinstance(track, DirectTrack):
                track.on_failed = self._send_failed
                track.start(pc.localDescription.sdp, answer)

    def _send_failed(self) -> None:
        self._fail("sending the media failed (see webrtc_send_failed in the log)")

    def _fail(self, why: str) -> None:
        if not self.failed.is_set():
            self.failure = why
            self.failed.set()

    async def _watch_peer(self, pc: RTCPeerConnection) -> None:
        """Set ``failed`` when the connected peer falls silent (see SILENT_PEER)."""
        loop = asyncio.get_running_loop()
        last_count, last_at, longest = -1, loop.time(), 0.0
        while not self.failed.is_set():
            await asyncio.sleep(until_beat(WATCH_EVERY))
            count = sum(getattr(s, "packetsReceived", 0) or 0
                        for s in (await pc.getStats()).values() if s.type == "transport")
            now = loop.time()
            if count != last_count:
                if last_count >= 0:
                    longest = max(longest, now - last_at)
                last_count, last_at = count, now
            elif now - last_at >= max(SILENT_PEER, 2 * longest):
                log.warning("whip_peer_silent", url=self._url, seconds=round(now - last_at, 1))
                self._fail(f"the WHIP peer sent nothing for {now - last_at:.1f} s")

    async def _post(self, offer: str, timeout: float) -> tuple[str, str]:
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {self._bearer}",
                   "User-Agent": USER_AGENT}
        url = self._url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    response = await http.post(url, data=offer, headers=headers,
                                               allow_redirects=False)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise WhipError("unreachable", f"WHIP server unreachable: {exc}") from None
                async with response:
                    if response.status in (307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])  # RFC 9725 §4.5
                        continue
                    body = await response.text()
                    if response.status != 201:
                        raise WhipError(f"http_{response.status}",
                                        f"WHIP server answered {response.status}: "
                                        f"{body[:200]}")
                    location = response.headers.get("Location")
                    if not location:
                        raise WhipError("no_location", "WHIP answer without Location")
                    links = response.headers.getall("Link", [])
                    if links:
                        log.debug("whip_ice_servers", count=len(ice_servers_from_links(links)))
                    return body, urljoin(url, location)
        raise WhipError("redirect_loop", f"more than {MAX_REDIRECTS} redirects")

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes_sent for t in self.tracks)

    async def stop(self) -> None:
        """DELETE the WHIP resource, release the camera, close the peer. Idempotent."""
        if self._watch is not None:
            self._watch.cancel()
        for track in self.tracks:
            if isinstance(track, DirectTrack):
                track.close()
            else:
                self._hub.unsubscribe(track._consumer)
        self.tracks = []
        if self.resource is not None:
            resource, self.resource = self.resource, None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=2)) as http:
                    await http.delete(resource,
                                      headers={"Authorization": f"Bearer {self._bearer}",
                                               "User-Agent": USER_AGENT})
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await self.pc.close()
