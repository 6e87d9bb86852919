"""WHEP (WebRTC-HTTP Egress Protocol, draft-ietf-wish-whep) for LAN viewers.

POST the SDP offer to ``/whep/{camera}`` → ``201 Created`` with the SDP answer and the
session's ``Location``; ``DELETE`` that location to stop. ICE is gathered before answering
(no trickle), so ``PATCH`` gets ``405`` (RFC 9725 §4.3.1 rule, shared by WHEP). ICE servers
are announced in ``Link: <url>; rel="ice-server"`` headers (WHEP §4.4).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from agent.access.model import Protocol
from agent.access.policy import Reason
from agent.access.service import AccessService
from agent.access.sessions import Refusal, Session, SessionLimitReached
from agent.config import WebrtcSection
from agent.http.auth import camera_access, denial, error, peer_ip, presented_token
from agent.http.connections import read_body
from agent.media.cameras import Cameras
from agent.media.hub import CameraHub, CameraState
from agent.webrtc import stack
from agent.webrtc.ice import ice_servers, to_rtc
from agent.webrtc.offer import OfferError, check_offer

if TYPE_CHECKING:  # the WebRTC stack loads with the first offer (agent/webrtc/stack.py)
    from aiortc import RTCRtpCodecParameters

    from agent.webrtc.rtpsend import ReceptionStats
    from agent.webrtc.session import ViewerSession

log = structlog.get_logger(__name__)

PROTOCOL = Protocol.WEBRTC
RETRY_AFTER_OFFLINE = "5"
#: Offers may name these character sets (RFC 8866 §5.7: SDP text is UTF-8 by default).
CHARSETS = {None, "utf-8", "utf8", "us-ascii"}
ICE_TIMEOUT = "ice_timeout"


@dataclass
class _Live:
    viewer: ViewerSession
    access: Session
    deadline: asyncio.TimerHandle | None = None


def _offer_text(request: web.Request, body: bytes) -> str | web.Response:
    """The offer as text, or the 4xx that says why it is not: unknown charset → 415, bytes
    that are not UTF-8 → 400. Never an exception (a bad body was a 500)."""
    charset = request.charset.lower() if request.charset else None
    if charset not in CHARSETS:
        return error(415, "unsupported_media_type",
                     f"the offer's charset {(charset or '')[:40]!r} is not supported: send UTF-8")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return error(400, "bad_offer", "the offer is not valid UTF-8 text")


def _refused(refusal: Refusal) -> web.Response:
    return error(refusal.status, refusal.code, refusal.message,
                 **{"Retry-After": str(refusal.retry_after)})


class WhepEndpoint:
    def __init__(self, access: AccessService, cameras: Cameras, webrtc: WebrtcSection,
                 camera_timeout: float, handshake_timeout: float = 10.0) -> None:
        self._access = access
        self._cameras = cameras
        self._webrtc = webrtc
        self._ice_servers = ice_servers(webrtc)  # reads TURN secrets: at start
        self._timeout = camera_timeout + 1.0
        self._handshake = handshake_timeout
        self._live: dict[str, _Live] = {}
        self._closing: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def reception(self) -> list[tuple[str, ReceptionStats]]:
        """(camera id, receiver-report figures) of each live viewer on the agent's send path."""
        return [(live.viewer.camera_id, stats) for live in self._live.values()
                if (stats := live.viewer.reception) is not None]

    def reception_of(self, session_id: str) -> ReceptionStats | None:
        """A live viewer's latest receiver-report figures (None: not one of ours, the aiortc
        send path, or no report yet)."""
        live = self._live.get(session_id)
        return live.viewer.reception if live is not None else None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/whep/{camera}", self.post)
        app.router.add_delete("/whep/{camera}/sessions/{session}", self.delete)
        app.router.add_patch("/whep/{camera}/sessions/{session}", self.patch)

    def ice_links(self) -> list[str]:
        links = []
        for server in self._webrtc.ice_servers:
            for url in server.urls:
                link = f'<{url}>; rel="ice-server"'
                if server.username:  # the credential itself is never sent in a header
                    quoted = server.username.replace("\\", "\\\\").replace('"', '\\"')
                    link += f'; username="{quoted}"'
                links.append(link)
        return links

    async def post(self, request: web.Request) -> web.StreamResponse:
        found = await camera_access(self._access, self._cameras, request, PROTOCOL,
                                    opens_session=True)
        if isinstance(found, web.Response):
            return found
        decision, camera = found
        camera_id = camera.id
        if request.content_type != "application/sdp":
            return error(415, "unsupported_media_type",
                         "send the SDP offer with Content-Type: application/sdp")
        offer = _offer_text(request, await read_body(request))
        if isinstance(offer, web.Response):
            return offer
        try:
            check_offer(offer)  # counts lines before aiortc parses anything
        except OfferError as exc:
            return error(400, "bad_offer", str(exc))
        admission = self._access.sessions.admit(peer_ip(request), decision.token_id)
        if isinstance(admission, Refusal):
            return _refused(admission)
        hub = camera.hub
        holder = hub.subscribe()  # starts the pull, and keeps it while we answer
        try:
            if not await hub.ready(self._timeout):
                admission.release()
                if hub.status.state is CameraState.UNSUPPORTED:
                    return error(501, "unsupported_codec", hub.status.error or "")
                return error(503, "camera_offline",
                             f"camera {camera_id!r} is offline: {hub.status.error or 'starting'}",
                             **{"Retry-After": RETRY_AFTER_OFFLINE})
            await stack.load()  # once per process: a few tenths of a second, in a thread
            from agent.webrtc.session import ViewerSession  # noqa: PLC0415 (loaded just now)

            try:
                video = await self._video_codecs(camera_id, hub, offer)
            except OfferError as exc:
                admission.release()
                return error(400, "bad_offer", str(exc))
            if isinstance(video, str):
                admission.release()
                log.info("whep_codec_refused", camera=camera_id, codec=hub.status.codec,
                         token_id=decision.token_id)
                return error(501, "unsupported_codec", video)
            try:
                viewer, answer = await ViewerSession.answer(
                    camera_id, hub, offer, to_rtc(self._ice_servers),
                    direct=self._webrtc.send_path == "agent", video_codecs=video)
            except OfferError as exc:
                admission.release()
                return error(400, "bad_offer", str(exc))
        except BaseException:
            admission.release()
            raise
        finally:
            hub.unsubscribe(holder)
        try:
            session = self._access.open_session(
                decision, camera_id, PROTOCOL, peer_ip(request),
                close=lambda reason: self._end(viewer, reason),
                bytes_sent=lambda: viewer.bytes_sent, session_id=viewer.id,
                admission=admission, pending=True,
            )
        except SessionLimitReached:  # another offer under this token won the last place
            admission.release()
            await viewer.close()
            return denial(decision._replace(reason=Reason.SESSION_LIMIT))
        live = _Live(viewer, session)
        self._live[viewer.id] = live
        viewer.on_closed = self._closed
        self._watch_handshake(live)
        log.info("whep_session_started", camera=camera_id, session=viewer.id,
                 token_id=decision.token_id, peer_ip=peer_ip(request))
        location = f"/whep/{camera_id}/sessions/{viewer.id}"
        response = web.Response(status=201, body=answer.encode(), content_type="application/sdp",
                                headers={"Location": location})
        for link in self.ice_links():
            response.headers.add("Link", link)
        return response

    async def _video_codecs(self, camera_id: str, hub: CameraHub, offer: str
                            ) -> list[RTCRtpCodecParameters] | str | None:
        """The answer's video formats for an H.265 camera (None: H.264, aiortc negotiates
        it), or the 501 message that says why this viewer cannot have the camera's video
        and what it can do instead. H.264 cameras are answered in H.264 as before."""
        from agent.webrtc import h265  # noqa: PLC0415 (imports aiortc: loaded by now)

        if (refusal := hub.webrtc_refusal()) is not None:
            return refusal
        assert hub.info is not None
        if hub.info.codec != "hevc":
            return None
        if self._webrtc.send_path != "agent":
            return h265.refusal(camera_id, h265.AIORTC_PATH)
        if not h265.offers_h265(offer):
            return h265.refusal(camera_id, h265.NO_H265_OFFERED)
        profile = await h265.camera_profile(hub, self._timeout)
        chosen = h265.choose(h265.offered_formats(offer), profile, camera_id)
        if not chosen:
            return h265.refusal(camera_id, h265.no_fit(profile))
        return chosen

    def _watch_handshake(self, live: _Live) -> None:
        """Whatever the offer held (no candidates, no end-of-candidates), a session that is
        not connected within the handshake deadline is closed and audited: it held sockets
        and memory for good before."""
        pc = live.viewer.pc
        live.deadline = asyncio.get_running_loop().call_later(
            self._handshake, self._handshake_expired, live.viewer.id)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected" and live.deadline is not None:
                live.deadline.cancel()
                live.deadline = None
                self._access.sessions.connected(live.access.id)

    def _handshake_expired(self, viewer_id: str) -> None:
        live = self._forget(viewer_id)
        if live is None:
            return
        self._access.end_session(live.access.id, ICE_TIMEOUT)
        log.info("whep_session_ended", session=viewer_id, reason=ICE_TIMEOUT,
                 waited_s=self._handshake)
        self._close_later(live.viewer)

    def _forget(self, viewer_id: str) -> _Live | None:
        live = self._live.pop(viewer_id, None)
        if live is not None and live.deadline is not None:
            live.deadline.cancel()
            live.deadline = None
        return live

    def _close_later(self, viewer: ViewerSession) -> None:
        task = asyncio.get_running_loop().create_task(viewer.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _end(self, viewer: ViewerSession, reason: str) -> None:
        """Called by the access service when the token no longer allows the session."""
        log.info("whep_session_ended", session=viewer.id, reason=reason)
        self._forget(viewer.id)
        self._close_later(viewer)

    def _closed(self, viewer: ViewerSession) -> None:
        live = self._forget(viewer.id)
        if live is not None:
            self._access.end_session(live.access.id, "disconnected")

    async def delete(self, request: web.Request) -> web.StreamResponse:
        live = self._live.get(request.match_info["session"])
        camera_id = request.match_info["camera"]
        decision = await self._access.authorize(presented_token(request), camera_id, PROTOCOL,
                                                peer_ip(request))
        if not decision.granted:
            return denial(decision)
        if live is None or live.viewer.camera_id != camera_id or (
                live.access.token_id != decision.token_id):
            return error(404, "unknown_session", "no such WHEP session (it may have ended)")
        self._forget(live.viewer.id)
        self._access.end_session(live.access.id, "deleted")
        await live.viewer.close()
        return web.Response(status=200)

    async def patch(self, _request: web.Request) -> web.StreamResponse:
        return error(405, "method_not_allowed",
                     "trickle ICE and ICE restarts are not supported: candidates are in the "
                     "answer", Allow="DELETE")

    async def close_camera(self, camera_id: str, why: str) -> None:
        """A camera left the configuration (or changed): end its sessions, audited."""
        live = [s for s in self._live.values() if s.viewer.camera_id == camera_id]
        for session in live:
            self._forget(session.viewer.id)
            self._access.end_session(session.access.id, why)
        await asyncio.gather(*(session.viewer.close() for session in live))

    async def close(self) -> None:
        """The agent is stopping: end every session, audited as such."""
        live = list(self._live.values())
        for session in live:
            self._forget(session.viewer.id)
            self._access.end_session(session.access.id, "shutdown")
        await asyncio.gather(*(session.viewer.close() for session in live))
