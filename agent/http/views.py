"""Snapshots, the camera list, and the viewer page."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from aiohttp import web

from agent.access.model import Action, Protocol
from agent.access.policy import Site, scope_covers
from agent.access.service import AccessService
from agent.errors import SourceError
from agent.http import openapi
from agent.http.auth import camera_access, denial, error, peer_ip, presented_token
from agent.media.cameras import Cameras
from agent.media.hub import CameraState
from agent.media.snapshot import Snapshotter
from agent.webrtc import stack


class Views:
    def __init__(self, access: AccessService, cameras: Cameras, snapshots: Snapshotter,
                 site: Site, rtsp_port: Callable[[], int | None] = lambda: None,
                 hls: bool = False) -> None:
        self._access = access
        self._cameras = cameras
        self._snapshots = snapshots
        self._site = site
        self._rtsp_port = rtsp_port  # None while RTSP is not served
        self._hls = hls  # HLS is served (hls.enabled)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/snapshot/{camera}.jpg", self.snapshot)
        app.router.add_get("/api/v1/cameras", self.cameras)
        app.router.add_get("/", self.page)
        app.router.add_get("/viewer.js", self.script)
        app.router.add_get("/favicon.ico", self.no_icon)
        app.router.add_get("/studio", self.studio)
        app.router.add_get("/studio.js", self.studio_script)
        app.router.add_get("/api/v1/openapi.json", self.openapi)

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        found = await camera_access(self._access, self._cameras, request,
                                    Protocol.SNAPSHOT)
        if isinstance(found, web.Response):
            return found
        _, camera = found
        camera_id = camera.id
        try:
            jpeg = await self._snapshots.jpeg(camera.hub)  # (re)opens the camera if idle
        except SourceError as exc:  # the camera sends something that is not a picture
            return error(503, "camera_unreadable",
                         f"camera {camera_id!r} sent a picture that cannot be decoded: {exc}",
                         **{"Retry-After": "5"})
        if jpeg is None and camera.hub.status.state is CameraState.UNSUPPORTED:
            return error(501, "unsupported_codec", camera.hub.status.error or "")
        if jpeg is None:
            return error(503, "camera_offline",
                         f"camera {camera_id!r} sent no picture: "
                         f"{camera.hub.status.error or 'still starting'}",
                         **{"Retry-After": "5"})
        return web.Response(body=jpeg, content_type="image/jpeg",
                            headers={"Cache-Control": "no-store"})

    async def cameras(self, request: web.Request) -> web.StreamResponse:
        decision = await self._access.authorize(presented_token(request), None, None,
                                                peer_ip(request), action=Action.LIST)
        if not decision.granted or decision.record is None:
            return denial(decision)
        record = decision.record
        visible = [c for c in self._cameras if scope_covers(record, c.id, self._site)]
        port = self._rtsp_port()
        # the host this client reached us by; the token is never put in the URL here
        host = request.url.host or "127.0.0.1"
        rtsp_base = (f"rtsp://{f'[{host}]' if ':' in host else host}:{port}/"
                     if port is not None else None)
        return web.json_response({
            "agent_id": self._site.agent_id,
            "token": {"id": record.id, "scope": str(record.scope),
                      "protocols": sorted(record.protocols) or ["all"],
                      "expires_at": record.expires_at},
            "cameras": [{"id": c.id, "name": c.name, "viewers": c.hub.viewers,
                         "rtsp_url": f"{rtsp_base}{c.id}" if rtsp_base else None,
                         "hls_url": f"/hls/{c.id}/index.m3u8" if self._hls else None,
                         **c.hub.status.as_dict()} for c in visible],
        })

    async def page(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(text=_asset("viewer.html"), content_type="text/html",
                            headers=_PAGE_HEADERS)

    async def studio(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(text=_asset("studio.html"), content_type="text/html",
                            headers=_PAGE_HEADERS)

    async def studio_script(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(text=_asset("studio.js"), content_type="application/javascript",
                            headers={"Cache-Control": "no-cache"})

    async def openapi(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi.document())

    async def no_icon(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def script(self, _request: web.Request) -> web.StreamResponse:
        stack.preload()  # a browser about to send a WHEP offer: load WebRTC meanwhile
        return web.Response(text=_asset("viewer.js"), content_type="application/javascript",
                            headers={"Cache-Control": "no-cache"})


# The page loads nothing from elsewhere (the LAN may have no internet) and the token stays in
# the fragment: no referrer, no framing, no inline script.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; media-src 'self' "
                               "blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> str:
    return resources.files("agent.http").joinpath("static", name).read_text(encoding="utf-8")
