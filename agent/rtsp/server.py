"""The RTSP server: a thin asyncio layer over the sans-I/O protocol, the hub and AccessService.

URL ``rtsp://<agent>:8554/<camera-id>``; the token is the Basic password (any user name) or
``?token=``. Every DESCRIBE, SETUP and PLAY goes through ``AccessService.check`` with protocol
``rtsp``; a PLAYing client is a live session in the registry, so revocation, expiry or the
camera's removal closes its connection within the service's sweep interval.

A session belongs to its connection (closing the connection ends it). Limits: one session per
connection, ``MAX_CONNECTIONS`` connections, a request head must arrive within
``HEAD_TIMEOUT`` (slowloris), a session not playing (or a UDP one without keep-alive) ends after
``session_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from dataclasses import dataclass, field

import structlog

from agent.access.model import Protocol
from agent.access.policy import Decision, Reason
from agent.access.service import AccessService
from agent.access.sessions import Refusal, SessionLimitReached
from agent.access.sessions import Session as AccessSession
from agent.beat import until_beat
from agent.config import RtspSection
from agent.media.cameras import Camera, Cameras
from agent.rtsp import sdp
from agent.rtsp.protocol import (
    SERVER_NAME,
    Interleaved,
    ParseError,
    Parser,
    Request,
    Target,
    basic_password,
    parse_transport,
    parse_url,
    response,
)
from agent.rtsp.sender import TrackSender

log = structlog.get_logger(__name__)

PROTOCOL = Protocol.RTSP
REALM = SERVER_NAME
PUBLIC = "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER"
MAX_CONNECTIONS = 512
HEAD_TIMEOUT = 10.0  # seconds for a started request to complete (or session_timeout)
READ_SIZE = 65536
#: Bytes a client's socket may hold unsent before it skips to the next keyframe.
MAX_CLIENT_BUFFER = 2 * 1024 * 1024
HOUSEKEEPING = 0.5
CLOSE_FLUSH = 64 * 1024  # a closing connection still flushes this much (its last answer)
CLOSE_GRACE = 2.0


@dataclass(eq=False)
class _RtspSession:
    id: str
    camera: Camera
    tcp: bool
    senders: dict[int, TrackSender] = field(default_factory=dict)
    playing: bool = False
    access: AccessSession | None = None

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.senders.values())

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()


class _Udp(asyncio.DatagramProtocol):
    """The server's RTP/RTCP port pair; RTCP from clients is read and ignored."""


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    peer_ip: str
    parser: Parser = field(default_factory=Parser)
    token: str | None = None  # the last token presented on this connection
    session: _RtspSession | None = None
    last_request: float = field(default_factory=time.monotonic)
    head_started: float | None = None
    busy: bool = False  # a request is being answered (e.g. waiting for the camera)
    closing: bool = False
    task: asyncio.Task[None] | None = None

    def send(self, data: bytes) -> None:
        if not self.closing:
            self.writer.write(data)

    def close(self) -> None:
        """End from the agent's side: nothing more is sent; a stuck peer is aborted."""
        if self.closing:
            return
        self.closing = True
        if self.session is not None:
            self.session.close()
        transport = self.writer.transport
        if transport.get_write_buffer_size() > CLOSE_FLUSH:
            transport.abort()  # queued media: not worth delivering
            return
        transport.close()  # the last answer is flushed first, for at most CLOSE_GRACE
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)


class RtspServer:
    def __init__(self, access: AccessService, cameras: Cameras, section: RtspSection,
                 camera_timeout: float) -> None:
        self._access = access
        self._cameras = cameras
        self._section = section
        self._timeout = camera_timeout + 1.0
        self._server: asyncio.Server | None = None
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_ports: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self._connected = asyncio.Event()  # set while there are connections to look after
        self._housekeeping: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        return self._section.host_port

    async def start(self) -> None:
        host, port = self._section.host_port
        self._server = await asyncio.start_server(self._client, host or None, port,
                                                  limit=READ_SIZE, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        await self._bind_udp(host)
        self._housekeeping = asyncio.create_task(self._housekeep(), name="rtsp-housekeeping")
        log.info("rtsp_listening", listen=f"{host}:{self.port}",
                 udp_ports=list(self._udp_ports) if self._udp_ports else None)

    async def _bind_udp(self, host: str) -> None:
        """An RTP/RTCP pair (even, even+1; RFC 3550 §11) for UDP clients; none → TCP only."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(20):
            first = secrets.randbelow(15000) * 2 + 20000
            try:
                rtp, _ = await loop.create_datagram_endpoint(
                    _Udp, local_addr=(host or "0.0.0.0", first), family=family)  # noqa: S104
            except OSError:
                continue
            try:
                rtcp, _ = await loop.create_datagram_endpoint(
                    _Udp, local_addr=(host or "0.0.0.0", first + 1), family=family)  # noqa: S104
            except OSError:
                rtp.close()
                continue
            self._udp = [rtp, rtcp]
            self._udp_ports = (first, first + 1)
            return
        log.warning("rtsp_udp_unavailable", fix="UDP clients are refused (461); TCP works")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        connections = list(self._connections)
        for conn in connections:
            self._end(conn, "shutdown")
            if conn.task is not None:
                conn.task.cancel()  # one waiting for its camera, say
        await asyncio.gather(*(c.task for c in connections if c.task is not None),
                             return_exceptions=True)
        for transport in self._udp:
            transport.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def close_camera(self, camera_id: str, why: str) -> None:
        """A camera left the configuration (or changed): end its clients, audited."""
        for conn in list(self._connections):
            if conn.session is not None and conn.session.camera.id == camera_id:
                self._end(conn, why)

    def _end(self, conn: _Connection, why: str) -> None:
        self._drop_session(conn, why)
        conn.close()

    # -- connections -------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Connection(writer, peer[0] if peer else "", task=asyncio.current_task())
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.write(response(503, None))
            writer.close()
            return
        self._connections.add(conn)
        self._connected.set()
        try:
            while not conn.closing:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for event in conn.parser.feed(data):
                    if isinstance(event, ParseError):
                        await self._refuse(conn, reader, event)
                        break
                    if isinstance(event, Interleaved):
                        conn.last_request = time.monotonic()  # RTCP from the client: alive
                        continue
                    conn.busy = True
                    try:
                        await self._handle(conn, event)
                    finally:
                        conn.busy = False
                        conn.last_request = time.monotonic()
                    if conn.closing:
                        break
                conn.head_started = (conn.head_started or time.monotonic()
                                     if conn.parser.partial else None)
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(conn)
            self._end(conn, "disconnected")

    async def _refuse(self, conn: _Connection, reader: asyncio.StreamReader,
                      error: ParseError) -> None:
        """Answer a request over the limits, then close gracefully: the rest of what the
        client sends is read and dropped for CLOSE_GRACE, so the answer is not lost to a
        reset (closing with unread input sends RST)."""
        log.info("rtsp_bad_request", peer_ip=conn.peer_ip, status=error.status, why=error.message)
        self._drop_session(conn, "bad_request")
        conn.send(response(error.status, None))
        conn.writer.write_eof()
        deadline = time.monotonic() + CLOSE_GRACE
        with contextlib.suppress(TimeoutError):
            while await asyncio.wait_for(reader.read(READ_SIZE), deadline - time.monotonic()):
                pass
        conn.close()

    def _drop_session(self, conn: _Connection, why: str) -> None:
        session = conn.session
        if session is None:
            return
        if session.access is not None:
            self._access.end_session(session.access.id, why)
            session.access = None
        session.close()
        conn.session = None

    async def _housekeep(self) -> None:
        """Once per HOUSEKEEPING: slow request heads and expired sessions end. Without
        connections it sleeps until one comes (no timer in an idle agent)."""
        while True:
            if not self._connections:
                self._connected.clear()
                await self._connected.wait()
            await asyncio.sleep(until_beat(HOUSEKEEPING))
            now = time.monotonic()
            head_timeout = min(HEAD_TIMEOUT, self._section.session_timeout)
            for conn in list(self._connections):
                session = conn.session
                if conn.head_started is not None:
                    if now - conn.head_started > head_timeout:
                        conn.send(response(408, None))
                        self._end(conn, "timeout")
                elif not conn.busy and now - conn.last_request > self._section.session_timeout and (
                        session is None or not session.playing or not session.tcp):
                    log.info("rtsp_session_timeout", session=session.id if session else None,
                             peer_ip=conn.peer_ip)
                    self._end(conn, "timeout")

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, conn: _Connection, req: Request) -> None:
        cseq = req.cseq
        if cseq is None:
            conn.send(response(400, None))
            return
        handler = {
            "OPTIONS": self._options, "DESCRIBE": self._describe, "SETUP": self._setup,
            "PLAY": self._play, "PAUSE": self._pause, "TEARDOWN": self._teardown,
            "GET_PARAMETER": self._keepalive,
        }.get(req.method)
        if handler is None:
            conn.send(response(501, cseq, {"Public": PUBLIC}))
            return
        conn.send(await handler(conn, req, cseq))

    async def _options(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        return response(200, cseq, {"Public": PUBLIC, **self._session_header(conn, req)})

    def _session_header(self, conn: _Connection, req: Request) -> dict[str, str]:
        session = conn.session
        if session is not None and _session_id(req) == session.id:
            return {"Session": f"{session.id};timeout={int(self._section.session_timeout)}"}
        return {}

    async def _keepalive(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        given = req.headers.get("session")
        if given is not None and not self._session_header(conn, req):
            return response(454, cseq)
        return response(200, cseq, self._session_header(conn, req))

    async def _authorized(
        self, conn: _Connection, req: Request, *, opens_session: bool = False
    ) -> tuple[Target, Camera, Decision] | bytes:
        """The request's camera, authorized for this client; else the answer to send.
        ``opens_session``: the token's session cap applies (a PLAY that starts a session)."""
        assert req.cseq is not None
        target = parse_url(req.uri)
        if target is None:
            return response(404, req.cseq)
        token = basic_password(req.headers) or target.token or conn.token
        if token is None:
            # RTSP clients ask first without credentials and answer the challenge
            # (RFC 2326 §D.2.1): not a failed attempt, so the failure limiter is not spent.
            return response(401, req.cseq, {"WWW-Authenticate": f'Basic realm="{REALM}"'})
        decision = await self._access.authorize(token, target.camera, PROTOCOL, conn.peer_ip,
                                                opens_session=opens_session)
        if not decision.granted:
            return refusal(decision, req.cseq)
        conn.token = token
        camera = self._cameras.get(target.camera)
        if camera is None:
            return response(404, req.cseq)
        return target, camera, decision

    async def _ready(self, camera: Camera, cseq: str) -> bytes | None:
        hub = camera.hub
        holder = hub.subscribe()  # starts the pull and keeps it while we wait
        try:
            if not await hub.ready(self._timeout) or hub.info is None:
                return response(503, cseq, {"Retry-After": "5"})
            if hub.info.codec not in ("h264", "hevc"):
                return response(415, cseq)
        finally:
            hub.unsubscribe(holder)
        return None

    async def _describe(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        found = await self._authorized(conn, req)
        if isinstance(found, bytes):
            return found
        _target, camera, _decision = found
        if (problem := await self._ready(camera, cseq)) is not None:
            return problem
        hub = camera.hub
        assert hub.info is not None
        keyframe = await hub.keyframe(self._timeout)
        body = sdp.describe(hub.info, keyframe[0].data if keyframe else b"",
                            self._local_address(conn)).encode()
        return response(200, cseq, {"Content-Base": self._base(req.uri, camera.id),
                                    "Content-Type": "application/sdp"}, body)

    def _local_address(self, conn: _Connection) -> str:
        sock = conn.writer.get_extra_info("sockname")
        return str(sock[0]) if sock else "0.0.0.0"  # noqa: S104 (an SDP origin, not a bind)

    @staticmethod
    def _base(uri: str, camera_id: str) -> str:
        """The request URL up to the camera id, with a trailing slash (no query: no token)."""
        head = uri.split("?", 1)[0].rstrip("/")
        if head.endswith("/" + camera_id):
            return head + "/"
        return head.rsplit("/", 1)[0] + "/"

    async def _setup(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        found = await self._authorized(conn, req)
        if isinstance(found, bytes):
            return found
        target, camera, _decision = found
        session, given = conn.session, _session_id(req)
        if given is not None and (session is None or given != session.id):
            return response(454, cseq)
        if session is not None and (session.camera.id != camera.id or session.playing):
            return response(455, cseq)  # one camera per session; no SETUP while playing
        if (problem := await self._ready(camera, cseq)) is not None:
            return problem
        assert camera.hub.info is not None
        tracks = {t.control: (i, t) for i, t in enumerate(sdp.tracks(camera.hub.info))}
        if target.track not in tracks:
            return response(404, cseq)  # a track this camera does not have
        index, track = tracks[target.track]
        spec = parse_transport(req.headers.get("transport", ""))
        if spec is None or spec.multicast or (not spec.tcp and self._udp_ports is None):
            return response(461, cseq)
        if session is None:
            session = _RtspSession(secrets.token_hex(8), camera, spec.tcp)
            conn.session = session
        elif session.tcp != spec.tcp:
            return response(461, cseq)  # one transport per session
        old = session.senders.pop(index, None)
        if old is not None:
            old.close()
        if spec.tcp:
            channels = spec.channels or (2 * index, 2 * index + 1)
            if channels[0] > 255 or channels[1] > 255:
                return response(461, cseq)
            transport = conn.writer.transport
            sender = TrackSender(camera.hub, track.video, track.payload_type,
                                 write=lambda parts: transport.write(b"".join(parts)),
                                 buffered=transport.get_write_buffer_size,
                                 max_buffer=MAX_CLIENT_BUFFER, channel=channels[0])
            answer = f"RTP/AVP/TCP;unicast;interleaved={channels[0]}-{channels[1]}"
        else:
            assert spec.client_ports is not None and self._udp_ports is not None
            udp = self._udp[0]
            # Always the RTSP peer's own address: a destination= parameter is ignored, so
            # the server cannot be made to send a stream to a third party (RFC 2326 §16.2).
            address = (conn.peer_ip, spec.client_ports[0])
            sender = TrackSender(camera.hub, track.video, track.payload_type,
                                 write=lambda parts: _send_datagrams(udp, parts, address),
                                 buffered=lambda: _backlog(udp),
                                 max_buffer=MAX_CLIENT_BUFFER)
            answer = (f"RTP/AVP;unicast;client_port={spec.client_ports[0]}-"
                      f"{spec.client_ports[1]};server_port={self._udp_ports[0]}-"
                      f"{self._udp_ports[1]}")
        session.senders[index] = sender
        return response(200, cseq, {
            "Transport": f"{answer};ssrc={sender.ssrc:08X}",
            "Session": f"{session.id};timeout={int(self._section.session_timeout)}"})

    async def _play(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        session = conn.session
        found = await self._authorized(conn, req, opens_session=session is not None
                                       and session.access is None)
        if isinstance(found, bytes):
            return found
        _target, camera, decision = found
        session, given = conn.session, _session_id(req)
        if given is None or session is None:
            return response(455 if given is None else 454, cseq)  # PLAY before SETUP
        if given != session.id:
            return response(454, cseq)
        if session.camera.id != camera.id:
            return response(455, cseq)
        if session.access is None:
            # the same source-address caps as WHEP (sessions.*): 429/503 with Retry-After
            admission = self._access.sessions.admit(conn.peer_ip, decision.token_id)
            if isinstance(admission, Refusal):
                return response(admission.status, cseq,
                                {"Retry-After": str(admission.retry_after)})
            try:
                session.access = self._access.open_session(
                    decision, camera.id, PROTOCOL, conn.peer_ip,
                    close=lambda reason: self._ended(conn, reason),
                    bytes_sent=lambda: session.bytes_sent, session_id=session.id,
                    admission=admission)
            except SessionLimitReached:  # another session of this token took the last place
                admission.release()
                return refusal(decision._replace(reason=Reason.SESSION_LIMIT), cseq)
            log.info("rtsp_session_started", camera=camera.id, session=session.id,
                     token_id=decision.token_id, peer_ip=conn.peer_ip,
                     transport="tcp" if session.tcp else "udp")
        base = self._base(req.uri, camera.id)
        info = ",".join(f"url={base}trackID={i};seq={s.seq}"
                        for i, s in sorted(session.senders.items()))
        reply = response(200, cseq, {
            "Session": f"{session.id};timeout={int(self._section.session_timeout)}",
            "Range": "npt=now-", "RTP-Info": info})
        conn.send(reply)  # before the first packet: clients read the reply first
        session.playing = True
        for sender in session.senders.values():
            sender.start()
        return b""

    def _ended(self, conn: _Connection, reason: str) -> None:
        """Called by the access service when the token no longer allows the session."""
        session = conn.session
        log.info("rtsp_session_ended", session=session.id if session else None, reason=reason)
        if session is not None:
            session.access = None  # the service has already removed and audited it
        conn.close()

    async def _pause(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        """A live camera has nothing to hold: sending stops; a later PLAY starts again from
        the cached GOP. The live session stays (the client still holds it)."""
        session = conn.session
        if session is None or not self._session_header(conn, req):
            return response(454, cseq)
        session.playing = False
        session.close()
        return response(200, cseq, self._session_header(conn, req))

    async def _teardown(self, conn: _Connection, req: Request, cseq: str) -> bytes:
        if conn.session is None or not self._session_header(conn, req):
            return response(454, cseq)
        self._drop_session(conn, "teardown")  # the connection may go on (RFC 2326 §10.7)
        return response(200, cseq)


def refusal(decision: Decision, cseq: str) -> bytes:
    """The answer to a refused request: 401 with the Basic challenge, 403, 404 or 429."""
    status = decision.http_status
    headers = {"WWW-Authenticate": f'Basic realm="{REALM}"'} if status == 401 else {}
    if status == 429:
        headers["Retry-After"] = "60"
    return response(status, cseq, headers)


def _session_id(req: Request) -> str | None:
    return req.headers.get("session", "").split(";")[0].strip() or None


def _backlog(udp: asyncio.DatagramTransport) -> int:
    """Bytes asyncio holds for a UDP socket the kernel would not take (shared by its clients)."""
    size = getattr(udp, "get_write_buffer_size", None)  # selector transports have it
    return int(size()) if size is not None else 0


def _send_datagrams(udp: asyncio.DatagramTransport, parts: list[bytes | memoryview],
                    address: tuple[str, int]) -> None:
    for datagram in parts:
        udp.sendto(datagram, address)
