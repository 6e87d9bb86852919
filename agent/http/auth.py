"""Turning an HTTP request into an AccessRequest, and a denial into a plain HTTP answer."""

from __future__ import annotations

from aiohttp import web

from agent.access.policy import Decision, Reason
from agent.access.service import AccessService
from agent.media.cameras import Camera, Cameras

RETRY_AFTER_LIMITED = "60"


def presented_token(request: web.Request) -> str | None:
    """``Authorization: Bearer <token>``, else ``?token=`` (players that cannot set headers)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token") or None


def peer_ip(request: web.Request) -> str | None:
    return request.remote


def denial(decision: Decision) -> web.Response:
    """401 (with WWW-Authenticate), 403 or 429 (with Retry-After); the reason in the body so
    the viewer page can say what to do. Nothing more about the token is revealed."""
    reason = decision.reason
    headers: dict[str, str] = {}
    if decision.http_status == 401:
        error = "invalid_request" if reason is Reason.MISSING else "invalid_token"
        headers["WWW-Authenticate"] = f'Bearer realm="therelay-agent", error="{error}"'
    elif decision.http_status == 429:
        headers["Retry-After"] = RETRY_AFTER_LIMITED
    return web.json_response(
        {"error": reason.value, "message": decision.fix}, status=decision.http_status,
        headers=headers)


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status,
                             headers=headers)


async def camera_access(
    access: AccessService, cameras: Cameras, request: web.Request, protocol: str,
    *, opens_session: bool = False,
) -> tuple[Decision, Camera] | web.Response:
    """Authorize a request for ``{camera}`` in the path, then find the camera. Unknown
    cameras are 404 only to a token whose scope could include them; others are denied first.
    ``opens_session``: the token's session cap applies (see ``AccessService.check``)."""
    camera_id = request.match_info["camera"]
    decision = await access.check(presented_token(request), camera_id, protocol,
                                  peer_ip(request), opens_session=opens_session)
    if not decision.granted:
        return denial(decision)
    camera = cameras.get(camera_id)
    if camera is None:
        return error(404, "unknown_camera", f"there is no camera {camera_id!r} here")
    return decision, camera
