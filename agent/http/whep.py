"""WHEP (WebRTC-HTTP Egress Protocol, draft-ietf-wish-whep) for LAN viewers.

POST the SDP offer to ``/whep/{camera}`` → ``201 Created`` with the SDP answer and the
session's ``Location``; ``DELETE`` that location to stop. ICE is gathered before answering
(no trickle), so ``PATCH`` gets ``405`` (RFC 9725 §4.3.1 rule, shared by WHEP). ICE servers
are announced in ``Link: <url>; rel="ice-server"`` headers (WHEP §4.4).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from aiohttp import web

from agent.access.service import AccessService
from agent.access.sessions import Session
from agent.config import WebrtcSection
from agent.http.auth import camera_access, denial, error, peer_ip, presented_token
from agent.media.cameras import Cameras
from agent.media.hub import CameraState
from agent.webrtc.ice import rtc_configuration
from agent.webrtc.rtpsend import ReceptionStats
from agent.webrtc.session import OfferError, ViewerSession

log = structlog.get_logger(__name__)

PROTOCOL = "webrtc"
RETRY_AFTER_OFFLINE = "5"


@dataclass
class _Live:
    viewer: ViewerSession
    access: Session


class WhepEndpoint:
    def __init__(self, access: AccessService, cameras: Cameras, webrtc: WebrtcSection,
                 camera_timeout: float) -> None:
        self._access = access
        self._cameras = cameras
        self._webrtc = webrtc
        self._rtc_configuration = rtc_configuration(webrtc)  # reads TURN secrets: at start
        self._timeout = camera_timeout + 1.0
        self._live: dict[str, _Live] = {}
        self._closing: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def reception(self) -> list[tuple[str, ReceptionStats]]:
        """(camera id, receiver-report figures) of each live viewer on the agent's send path."""
        return [(live.viewer.camera_id, stats) for live in self._live.values()
                if (stats := live.viewer.reception) is not None]

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
        found = await camera_access(self._access, self._cameras, request, PROTOCOL)
        if isinstance(found, web.Response):
            return found
        decision, camera = found
        camera_id = camera.id
        if request.content_type != "application/sdp":
            return error(415, "unsupported_media_type",
                         "send the SDP offer with Content-Type: application/sdp")
        offer = await request.text()
        hub = camera.hub
        holder = hub.subscribe()  # starts the pull, and keeps it while we answer
        try:
            if not await hub.ready(self._timeout):
                if hub.status.state is CameraState.UNSUPPORTED:
                    return error(501, "unsupported_codec", hub.status.error or "")
                return error(503, "camera_offline",
                             f"camera {camera_id!r} is offline: {hub.status.error or 'starting'}",
                             **{"Retry-After": RETRY_AFTER_OFFLINE})
            if (refusal := hub.webrtc_refusal()) is not None:  # H.265: RTSP clients only
                return error(501, "unsupported_codec", refusal)
            try:
                viewer, answer = await ViewerSession.answer(
                    camera_id, hub, offer, self._rtc_configuration,
                    direct=self._webrtc.send_path == "agent")
            except OfferError as exc:
                return error(400, "bad_offer", str(exc))
        finally:
            hub.unsubscribe(holder)
        session = self._access.open_session(
            decision, camera_id, PROTOCOL, peer_ip(request),
            close=lambda reason: self._end(viewer, reason),
            bytes_sent=lambda: viewer.bytes_sent, session_id=viewer.id,
        )
        self._live[viewer.id] = _Live(viewer, session)
        viewer.on_closed = self._closed
        log.info("whep_session_started", camera=camera_id, session=viewer.id,
                 token_id=decision.token_id, peer_ip=peer_ip(request))
        location = f"/whep/{camera_id}/sessions/{viewer.id}"
        response = web.Response(status=201, body=answer.encode(), content_type="application/sdp",
                                headers={"Location": location})
        for link in self.ice_links():
            response.headers.add("Link", link)
        return response

    def _end(self, viewer: ViewerSession, reason: str) -> None:
        """Called by the access service when the token no longer allows the session."""
        log.info("whep_session_ended", session=viewer.id, reason=reason)
        task = asyncio.get_running_loop().create_task(viewer.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _closed(self, viewer: ViewerSession) -> None:
        live = self._live.pop(viewer.id, None)
        if live is not None:
            self._access.end_session(live.access.id, "disconnected")

    async def delete(self, request: web.Request) -> web.StreamResponse:
        live = self._live.get(request.match_info["session"])
        camera_id = request.match_info["camera"]
        decision = await self._access.check(presented_token(request), camera_id, PROTOCOL,
                                          peer_ip(request))
        if not decision.granted:
            return denial(decision)
        if live is None or live.viewer.camera_id != camera_id or (
                live.access.token_id != decision.token_id):
            return error(404, "unknown_session", "no such WHEP session (it may have ended)")
        self._live.pop(live.viewer.id, None)
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
            self._live.pop(session.viewer.id, None)
            self._access.end_session(session.access.id, why)
        await asyncio.gather(*(session.viewer.close() for session in live))

    async def close(self) -> None:
        """The agent is stopping: end every session, audited as such."""
        live = list(self._live.values())
        self._live.clear()
        for session in live:
            self._access.end_session(session.access.id, "shutdown")
        await asyncio.gather(*(session.viewer.close() for session in live))
