"""HLS over HTTP: the playlists, init segment, segments and parts, and the HLS sessions.

``GET /hls/<camera>/index.m3u8`` (token: ``Authorization: Bearer`` or ``?token=``) is the one
request that presents the token: it goes through ``AccessService.authorize`` with protocol
``hls`` (the token's session cap applies), passes the source-address caps (``sessions.admit``)
and opens a live session. It answers a multivariant playlist whose one variant is
``s/<sid>/live.m3u8``: ``<sid>`` is 128 random bits, bound to the address that asked, and
every later URL carries it instead of the token (so the token is in no later URL, no access
log, no Referer). The session is a live session like a WebRTC or RTSP one: revocation,
expiry, a narrowed token or the token's cap end it (the access service's sweep, every 0.2 s),
and so does ``hls.session_timeout`` without a request. A session id that is unknown, ended or
presented from another address gets 401 ``hls_session_unknown``: open index.m3u8 again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from agent.access.model import Protocol
from agent.access.policy import Reason
from agent.access.service import AccessService
from agent.access.sessions import Refusal, SessionLimitReached
from agent.beat import until_beat
from agent.config import HlsSection
from agent.hls.muxer import HlsMuxer
from agent.http.auth import camera_access, denial, error, peer_ip
from agent.media.cameras import Camera, Cameras
from agent.media.hub import CameraState

log = structlog.get_logger(__name__)

PROTOCOL = Protocol.HLS
PLAYLIST = "application/vnd.apple.mpegurl"
MP4 = "video/mp4"
#: Blocking requests (playlist reloads, preload-hint parts) one session may hold at once.
BLOCKING_PER_SESSION = 4
#: A muxer whose camera has no HLS session left stops this long after its last request;
#: the hub then keeps pulling for media.idle_grace, as for any consumer that leaves.
MUXER_RELEASE = 2.0
HOUSEKEEPING = 0.5
RETRY_AFTER_OFFLINE = "5"
_SEGMENT = re.compile(r"seg(\d{1,9})\.m4s")
_PART = re.compile(r"part(\d{1,9})\.(\d{1,6})\.m4s")
_NUMBER = re.compile(r"\d{1,9}")


@dataclass(eq=False)
class _Session:
    sid: str  # the secret in the URLs; never logged
    public_id: str  # the id in logs and in the audit log
    camera_id: str
    peer_ip: str | None
    last_seen: float
    bytes_sent: int = 0
    blocking: int = 0
    ended: bool = False


def _unknown_session() -> web.Response:
    return error(401, "hls_session_unknown",
                 "this HLS session has ended (token revoked or expired, idle, or the camera "
                 "changed) or belongs to another address: open index.m3u8 with the token again",
                 **{"WWW-Authenticate": 'Bearer realm="therelay-agent", error="invalid_token"'})


class HlsServer:
    def __init__(self, access: AccessService, cameras: Cameras, section: HlsSection,
                 camera_timeout: float) -> None:
        self._access = access
        self._cameras = cameras
        self._section = section
        self._timeout = camera_timeout + 1.0
        self._sessions: dict[str, _Session] = {}
        self._muxers: dict[str, HlsMuxer] = {}
        self._used: dict[str, float] = {}  # camera id -> monotonic time of its last request
        self._opening: Counter[str] = Counter()  # index.m3u8 requests waiting, per camera
        self._blocking = 0
        self._busy = asyncio.Event()  # set while there are sessions or muxers to look after
        self._housekeeping: asyncio.Task[None] | None = None

    def routes(self, app: web.Application) -> None:
        # no HEAD: each answer opens a live session
        app.router.add_get("/hls/{camera}/index.m3u8", self.index, allow_head=False)
        app.router.add_get("/hls/{camera}/s/{sid}/live.m3u8", self.media_playlist)
        app.router.add_get("/hls/{camera}/s/{sid}/init.mp4", self.init)
        app.router.add_get("/hls/{camera}/s/{sid}/{name}", self.media)

    def start(self) -> None:
        self._housekeeping = asyncio.get_running_loop().create_task(
            self._housekeep(), name="hls-housekeeping")

    def sessions(self, camera_id: str) -> int:
        return sum(1 for s in self._sessions.values() if s.camera_id == camera_id)

    # -- the multivariant playlist: the token, once ------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        found = await camera_access(self._access, self._cameras, request, PROTOCOL,
                                    opens_session=True)
        if isinstance(found, web.Response):
            return found
        decision, camera = found
        ip = peer_ip(request)
        admission = self._access.sessions.admit(ip, decision.token_id)
        if isinstance(admission, Refusal):
            return error(admission.status, admission.code, admission.message,
                         **{"Retry-After": str(admission.retry_after)})
        self._opening[camera.id] += 1  # the muxer stays while we wait for the camera
        try:
            muxer = await self._ready_muxer(camera)
            if isinstance(muxer, web.Response):
                admission.release()
                return muxer
            session = _Session(secrets.token_urlsafe(16), uuid.uuid4().hex, camera.id, ip,
                               time.monotonic())
            try:
                access = self._access.open_session(
                    decision, camera.id, PROTOCOL, ip,
                    close=lambda reason: self._ended(session, reason),
                    bytes_sent=lambda: session.bytes_sent, session_id=session.public_id,
                    admission=admission)
            except SessionLimitReached:
                admission.release()
                return denial(decision._replace(reason=Reason.SESSION_LIMIT))
        except BaseException:
            admission.release()
            raise
        finally:
            self._opening[camera.id] -= 1
        self._sessions[session.sid] = session
        log.info("hls_session_started", camera=camera.id, session=access.id,
                 token_id=decision.token_id, peer_ip=ip)
        body = self._multivariant(muxer, session.sid).encode()
        session.bytes_sent += len(body)
        return web.Response(body=body, content_type=PLAYLIST,
                            headers={"Cache-Control": "no-store"})

    def _multivariant(self, muxer: HlsMuxer, sid: str) -> str:
        track = muxer.track
        assert track is not None
        status = muxer.hub.status
        bandwidth = round(status.bitrate_kbps * 1000 * 1.1) if status.bitrate_kbps else 0
        complete = muxer.segmenter.complete
        if not bandwidth and complete and (seconds := sum(s.duration for s in complete)):
            bandwidth = round(sum(s.size for s in complete) * 8 / seconds * 1.1)
        attributes = [f"BANDWIDTH={bandwidth or 2_000_000}", f'CODECS="{track.codec_string}"',
                      f"RESOLUTION={track.width}x{track.height}"]
        if status.fps:
            attributes.append(f"FRAME-RATE={status.fps:.3f}")
        return ("#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n"
                f"#EXT-X-STREAM-INF:{','.join(attributes)}\ns/{sid}/live.m3u8\n")

    async def _ready_muxer(self, camera: Camera) -> HlsMuxer | web.Response:
        """The camera's muxer, started if needed, once it has its init segment; else the
        answer that says why not (offline 503, a codec HLS cannot carry 501)."""
        hub = camera.hub
        muxer = self._muxer(camera)
        if not await hub.ready(self._timeout):
            if hub.status.state is CameraState.UNSUPPORTED:
                return error(501, "unsupported_codec", hub.status.error or "")
            return error(503, "camera_offline",
                         f"camera {camera.id!r} is offline: {hub.status.error or 'starting'}",
                         **{"Retry-After": RETRY_AFTER_OFFLINE})
        if hub.info is not None and hub.info.codec not in ("h264", "hevc"):
            return error(501, "unsupported_codec",
                         f"the camera sends {hub.info.codec.upper()} video; HLS carries H.264 "
                         "and H.265 only: set the camera (or its substream) to H.264")
        if not await muxer.wait(lambda: muxer.init is not None, self._timeout):
            if muxer.error is not None:
                return error(501, "unsupported_stream", f"camera {camera.id!r}: {muxer.error}")
            return error(503, "camera_offline",
                         f"camera {camera.id!r} sent no keyframe yet: try again",
                         **{"Retry-After": RETRY_AFTER_OFFLINE})
        return muxer

    def _muxer(self, camera: Camera) -> HlsMuxer:
        self._used[camera.id] = time.monotonic()
        muxer = self._muxers.get(camera.id)
        if muxer is None or muxer.stopped or muxer.hub is not camera.hub:
            s = self._section
            muxer = HlsMuxer(camera.hub, part_target=s.part_duration,
                             segment_target=s.segment_duration, max_segments=s.segments,
                             max_bytes=s.max_memory_mb * 1024 * 1024)
            muxer.start()
            self._muxers[camera.id] = muxer
            self._busy.set()
        return muxer

    # -- the session's requests ----------------------------------------------------------------

    def _session_muxer(self, session: _Session) -> HlsMuxer | None:
        """The muxer serving ``session``'s camera; None (the session ended) if the camera is
        gone or came back with a different stream (a new init segment: open index.m3u8
        again)."""
        camera = self._cameras.get(session.camera_id)
        if camera is None:
            return None
        muxer = self._muxers.get(camera.id)
        if muxer is not None and muxer.stream_changed:
            self._stream_changed(camera.id)
            return None
        return self._muxer(camera)

    def _stream_changed(self, camera_id: str) -> None:
        for other in list(self._sessions.values()):
            if other.camera_id == camera_id:
                self._end(other, "stream_changed")
        self._muxers.pop(camera_id, None)

    def _live(self, request: web.Request) -> tuple[_Session, HlsMuxer] | web.Response:
        """The request's live session and its camera's muxer, or the 401 that ends it."""
        session = self._session(request)
        muxer = self._session_muxer(session) if session is not None else None
        if session is None or muxer is None:
            return _unknown_session()
        return session, muxer

    def _session(self, request: web.Request) -> _Session | None:
        session = self._sessions.get(request.match_info["sid"])
        if (session is None or session.ended or session.camera_id != request.match_info["camera"]
                or session.peer_ip != peer_ip(request)):
            return None
        session.last_seen = time.monotonic()
        return session

    def _serve(self, session: _Session, body: bytes, content_type: str,
               cache: str) -> web.Response:
        session.bytes_sent += len(body)
        return web.Response(body=body, content_type=content_type,
                            headers={"Cache-Control": cache})

    async def media_playlist(self, request: web.Request) -> web.StreamResponse:
        found = self._live(request)
        if isinstance(found, web.Response):
            return found
        session, muxer = found
        query = request.query
        msn_text, part_text = query.get("_HLS_msn"), query.get("_HLS_part")
        if part_text is not None and msn_text is None:
            return error(400, "bad_request", "_HLS_part needs _HLS_msn (RFC 8216bis 6.2.5.2)")
        for name, text in (("_HLS_msn", msn_text), ("_HLS_part", part_text)):
            if text is not None and not _NUMBER.fullmatch(text):
                return error(400, "bad_request", f"{name} must be a whole number")
        segmenter = muxer.segmenter
        timeout = 3 * max(self._section.segment_duration, segmenter.target_duration())
        if msn_text is None:
            waited = await self._blocking_wait(
                session, muxer, lambda: segmenter.ready, self._timeout + timeout)
        else:
            msn, part = int(msn_text), int(part_text) if part_text is not None else None
            if segmenter.ready and segmenter.too_far(msn, part):
                return error(400, "bad_request",
                             f"_HLS_msn={msn}{'' if part is None else f' _HLS_part={part}'} "
                             "is too far ahead of the live edge (RFC 8216bis 6.2.5.2)")
            waited = await self._blocking_wait(
                session, muxer, lambda: segmenter.ready and segmenter.has(msn, part), timeout)
        if isinstance(waited, web.Response):
            return waited
        if not waited:
            return error(503, "not_available",
                         "the camera sent nothing new in time: it may be offline",
                         **{"Retry-After": "1"})
        return self._serve(session, segmenter.playlist_bytes(), PLAYLIST, "no-cache")

    async def _blocking_wait(self, session: _Session, muxer: HlsMuxer,
                             predicate: Callable[[], bool], timeout: float,
                             ) -> bool | web.Response:
        """Wait (bounded in time and in number of waiters) until ``predicate()``; 401 if the
        session ended meanwhile."""
        if predicate():
            return True
        if session.blocking >= BLOCKING_PER_SESSION or self._blocking >= self._section.max_blocking:
            return error(429, "too_many_blocking_requests",
                         "too many requests are waiting for this stream: try again",
                         **{"Retry-After": "1"})
        session.blocking += 1
        self._blocking += 1
        try:
            ok = await muxer.wait(predicate, timeout)
        finally:
            session.blocking -= 1
            self._blocking -= 1
            session.last_seen = time.monotonic()
        if session.ended:
            return _unknown_session()
        return bool(ok)

    async def init(self, request: web.Request) -> web.StreamResponse:
        found = self._live(request)
        if isinstance(found, web.Response):
            return found
        session, muxer = found
        waited = await self._blocking_wait(session, muxer, lambda: muxer.init is not None,
                                           self._timeout)
        if isinstance(waited, web.Response):
            return waited
        if muxer.init is None:
            return error(503, "not_available", "the camera sent no keyframe yet: try again",
                         **{"Retry-After": "1"})
        return self._serve(session, muxer.init, MP4, "no-cache")

    async def media(self, request: web.Request) -> web.StreamResponse:
        """``seg<msn>.m4s`` and ``part<msn>.<i>.m4s``; the next part (a preload hint) is
        waited for, like a blocking playlist reload."""
        found = self._live(request)
        if isinstance(found, web.Response):
            return found
        session, muxer = found
        segmenter = muxer.segmenter
        name = request.match_info["name"]
        if (match := _SEGMENT.fullmatch(name)) is not None:
            segment = segmenter.segment(int(match.group(1)))
            if segment is None or segment.data is None:
                return error(404, "not_found", "no such segment (it may have left the window)")
            return self._serve(session, segment.data, MP4, "max-age=60")
        if (match := _PART.fullmatch(name)) is None:
            return error(404, "not_found", "no such file in an HLS session")
        msn, index = int(match.group(1)), int(match.group(2))
        data = segmenter.part(msn, index)
        current = segmenter.current
        upcoming = current is not None and (
            (msn == current.msn and index == len(current.parts))
            or (msn == current.msn + 1 and index == 0))
        if data is None and upcoming:
            waited = await self._blocking_wait(
                session, muxer, lambda: segmenter.has(msn, index),
                3 * segmenter.target_duration())
            if isinstance(waited, web.Response):
                return waited
            data = segmenter.part(msn, index)
        if data is None:
            return error(404, "not_found", "no such part (it may have left the window)")
        return self._serve(session, data, MP4, "max-age=60")

    # -- ending ------------------------------------------------------------------------------

    def _ended(self, session: _Session, reason: str) -> None:
        """Called by the access service when the token no longer allows the session."""
        session.ended = True
        self._sessions.pop(session.sid, None)
        log.info("hls_session_ended", session=session.public_id, reason=reason)

    def _end(self, session: _Session, why: str) -> None:
        session.ended = True
        self._sessions.pop(session.sid, None)
        self._access.end_session(session.public_id, why)
        log.info("hls_session_ended", session=session.public_id, reason=why)

    async def _housekeep(self) -> None:
        while True:
            if not self._sessions and not self._muxers:  # idle: no timer until a muxer starts
                self._busy.clear()
                await self._busy.wait()
            await asyncio.sleep(until_beat(HOUSEKEEPING))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.blocking == 0 and now - session.last_seen > \
                        self._section.session_timeout:
                    self._end(session, "idle_timeout")
            for camera_id, muxer in list(self._muxers.items()):
                if muxer.stream_changed:
                    self._stream_changed(camera_id)
                elif not self.sessions(camera_id) and not self._opening[camera_id] and (
                        now - self._used.get(camera_id, 0) > MUXER_RELEASE):
                    del self._muxers[camera_id]
                    await muxer.stop()

    async def close_camera(self, camera_id: str, why: str) -> None:
        """A camera left the configuration (or changed): end its sessions, audited."""
        for session in list(self._sessions.values()):
            if session.camera_id == camera_id:
                self._end(session, why)
        muxer = self._muxers.pop(camera_id, None)
        if muxer is not None:
            await muxer.stop()

    async def close(self) -> None:
        """The agent is stopping: end every session, audited as such."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        for session in list(self._sessions.values()):
            self._end(session, "shutdown")
        muxers = list(self._muxers.values())
        self._muxers.clear()
        await asyncio.gather(*(m.stop() for m in muxers))
