"""The control channel to TheRelay cloud: connect, hello, follow tokens, reconnect politely.

Implements docs/relay-protocol.md version 1: the camera inventory, token sync, instant
revocation, usage batches, and on-demand WHIP publishing. The audit log is the durable
outbox of usage: batches are read from it after the last acknowledged seq, so nothing
acknowledged is lost and nothing unacknowledged is forgotten across restarts. When the
control channel drops, running publish sessions stop; the relay asks again after the
agent's next ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from aiortc import RTCConfiguration
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent import __version__
from agent.access import audit
from agent.access.service import AccessService
from agent.access.store import TokenStore
from agent.media.hub import CameraHub
from agent.relay import protocol
from agent.relay.protocol import (
    CLOSE_REASONS,
    TOKEN_REJECTIONS,
    Acked,
    Ping,
    ProtocolError,
    Publish,
    TokensRevoke,
    TokensSync,
    Unpublish,
    Unsupported,
    Welcome,
)
from agent.retry import FailureLog, backoff
from agent.webrtc.whip import WhipError, WhipPublisher

log = structlog.get_logger(__name__)

WELCOME_TIMEOUT = 10.0
INVENTORY_EVERY = 2.0
CLOCK_SKEW_WARN = 30.0
USAGE_EVERY = 5.0  # at most this long between an access and its report (section 1.5)
USAGE_ACK_TIMEOUT = 30.0
REJECTED_MIN, REJECTED_MAX = 30.0, 300.0  # a refused publisher token: never hammer the relay


class Rejected(Exception):
    """The relay refused the publisher token or this agent; ``reason`` is the code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


ADVICE = {
    "token_invalid": "the publisher token is not valid: copy it again from TheRelay Dashboard "
                     "(Settings > Tokens) into relay.publisher_token_file",
    "token_expired": "the publisher token has expired: create a new one in TheRelay Dashboard",
    "token_revoked": "the publisher token was revoked: create a new one in TheRelay Dashboard",
    "agent_not_allowed": "the publisher token is bound to another agent: set agent.id to the "
                         "agent the token was made for, or use an account-level token",
    "version_unsupported": "the relay does not speak this agent's protocol version: upgrade "
                           "the agent",
}


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"  # welcomed by the relay
    REJECTED = "rejected"  # the relay refused the publisher token (see last_error)
    DISCONNECTED = "disconnected"  # not configured, or between attempts


class RelayLink:
    def __init__(self, url: str, publisher_token: str, agent_id: str, store: TokenStore,
                 access: AccessService, inventory: Callable[[], list[dict[str, Any]]],
                 hubs: Callable[[str], CameraHub | None],
                 ice: Callable[[list[dict[str, Any]]], RTCConfiguration],
                 direct: bool = True) -> None:
        self._url = url
        self._direct = direct  # webrtc.send_path: agent
        self._token = publisher_token
        self._agent_id = agent_id
        self._store = store
        self._access = access
        self._inventory = inventory
        self._hubs = hubs
        self._ice = ice
        self.publishers: dict[str, WhipPublisher] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.state = LinkState.DISCONNECTED
        self.last_error: str | None = None
        self.welcome: Welcome | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._acks: dict[str, asyncio.Future[Acked]] = {}

    @property
    def publish_sessions(self) -> int:
        return len(self.publishers)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-link")

    async def stop(self) -> None:
        """Stop publishing and close the channel; bounded, whatever the relay does."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # A cancellation can land inside a library call that absorbs it (a WebSocket
            # handshake or close); the flag ends the loop then, and the wait is bounded.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 3)
            self._task = None
        await self._stop_publishing()
        self.state = LinkState.DISCONNECTED

    async def _run(self) -> None:
        failures = FailureLog(log, "relay_unavailable", url=self._url)
        ordinary: Iterator[float] = backoff(1.0, 60.0)
        rejected: Iterator[float] = backoff(REJECTED_MIN, REJECTED_MAX)
        while not self._stopping:
            self.state = LinkState.CONNECTING
            try:
                await self._connect_once()
                ordinary, rejected = backoff(1.0, 60.0), backoff(REJECTED_MIN, REJECTED_MAX)
                delay = next(ordinary)
                failures.recovered("relay_reconnecting")
            except Rejected as exc:
                self.state, self.last_error = LinkState.REJECTED, exc.reason
                if failures.count == 0 or self.last_error != exc.reason:
                    log.error("relay_rejected_agent", reason=exc.reason,
                              fix=ADVICE.get(exc.reason, str(exc)))
                failures.failed(exc.reason)
                delay = next(rejected)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed,
                    ProtocolError) as exc:
                self.state, self.last_error = LinkState.DISCONNECTED, _describe(exc)
                failures.failed(self.last_error)
                delay = next(ordinary)
            if not self._stopping:
                await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        try:
            ws = await connect(
                self._url, subprotocols=[protocol.SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {self._token}"},
                user_agent_header=f"therelay-agent/{__version__}", proxy=None,
                max_size=protocol.MAX_MESSAGE, open_timeout=10, close_timeout=2)
        except InvalidStatus as exc:
            raise rejection_of(exc) from None
        try:
            await self._session(ws)
        except ConnectionClosed as exc:
            reason = CLOSE_REASONS.get(exc.rcvd.code if exc.rcvd else 0)
            if reason in TOKEN_REJECTIONS:
                raise Rejected(reason) from None
            raise
        except ProtocolError as exc:
            log.warning("relay_protocol_error", error=str(exc))
            await ws.close(4009, "protocol_error")
            raise
        finally:
            await ws.close()
            self.state = LinkState.DISCONNECTED

    async def _session(self, ws: ClientConnection) -> None:
        cursor = await asyncio.to_thread(self._store.relay_cursor)
        await _send(ws, protocol.hello(self._agent_id, __version__, cursor, self._inventory()))
        first = protocol.parse(await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT))
        if not isinstance(first, Welcome):
            raise ProtocolError("the relay must answer hello with welcome")
        if first.agent_id != self._agent_id:
            raise Rejected("agent_not_allowed",
                           f"the token belongs to agent {first.agent_id!r}")
        self.welcome, self.state, self.last_error = first, LinkState.CONNECTED, None
        skew = round(time.time() - first.server_time, 3)
        log.info("relay_connected", account=first.account_id, agent=first.agent_id,
                 permission=first.permission, clock_skew_s=skew)
        if abs(skew) > CLOCK_SKEW_WARN:
            log.warning("clock_skew", seconds=skew,
                        fix="this machine's clock differs from the relay's: token expiry "
                            "depends on it; enable NTP (timedatectl set-ntp true)")
        if first.permission == "read":
            log.warning("relay_read_only", fix="this publisher token is read-only: cameras are "
                        "registered and reported, never published")
        reporter = asyncio.get_running_loop().create_task(self._report_inventory(ws))
        usage = asyncio.get_running_loop().create_task(self._report_usage(ws))
        try:
            async for text in ws:
                if self._stopping:
                    break
                await self._handle(ws, protocol.parse(text))
        finally:
            reporter.cancel()
            usage.cancel()
            await self._stop_publishing()

    async def _handle(self, ws: ClientConnection, event: protocol.Event) -> None:
        if isinstance(event, TokensSync):
            changed = await asyncio.to_thread(self._store.apply_relay_sync, event.tokens,
                                              full=event.full, cursor=event.cursor,
                                              now=time.time())
            await self._applied()
            log.info("relay_tokens_synced", full=event.full, tokens=len(event.tokens),
                     changed=changed, cursor=event.cursor)
            await _send(ws, protocol.ack(event.message_id, cursor=event.cursor))
        elif isinstance(event, TokensRevoke):
            known = await asyncio.to_thread(self._store.revoke_relay, event.token_id,
                                            event.revoked_at, time.time())
            await self._applied()  # live sessions under it end now
            log.info("relay_token_revoked", token_id=event.token_id, known=known)
            await _send(ws, protocol.ack(event.message_id))
        elif isinstance(event, Publish):
            await self._publish(ws, event)
        elif isinstance(event, Unpublish):
            await _send(ws, protocol.ack(event.message_id))
            publisher = self.publishers.pop(event.session_id, None)
            if publisher is not None:
                await publisher.stop()
                await self._status(ws, event.session_id, "stopped")
        elif isinstance(event, Ping):
            await _send(ws, protocol.pong(event.message_id))
        elif isinstance(event, Unsupported):
            await _send(ws, protocol.ack(event.message_id, error=(
                "unsupported", f"unknown message type {event.kind!r}")))
        elif isinstance(event, Acked):
            waiter = self._acks.pop(event.message_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)
            if not event.ok:
                log.warning("relay_refused_message", ack=event.message_id, error=event.error)

    async def _publish(self, ws: ClientConnection, event: Publish) -> None:
        assert self.welcome is not None
        hub = self._hubs(event.camera_id)
        if self.welcome.permission != "publish":
            await _send(ws, protocol.ack(event.message_id, error=(
                "read_only", "the publisher token is read-only")))
            return
        if hub is None:
            await _send(ws, protocol.ack(event.message_id, error=(
                "unknown_camera", f"no camera {event.camera_id!r} on this agent")))
            return
        await _send(ws, protocol.ack(event.message_id))
        publisher = WhipPublisher(hub, event.whip_url, event.bearer or self._token,
                                  self._ice(self.welcome.ice_servers), direct=self._direct)
        self.publishers[event.session_id] = publisher
        task = asyncio.get_running_loop().create_task(
            self._run_publisher(ws, event.session_id, publisher))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_publisher(self, ws: ClientConnection, session_id: str,
                             publisher: WhipPublisher) -> None:
        await self._status(ws, session_id, "starting")
        try:
            await publisher.start(timeout=15)
            await asyncio.wait_for(publisher.connected.wait(), 15)
        except Exception as exc:  # WhipError, ICE timeout, or anything aiortc raises
            code = (exc.code if isinstance(exc, WhipError)
                    else "ice_failed" if isinstance(exc, TimeoutError) else "internal")
            log.warning("whip_publish_failed", session=session_id, code=code, error=str(exc))
            self.publishers.pop(session_id, None)
            await publisher.stop()
            await self._status(ws, session_id, "failed", (code, str(exc) or code))
            return
        log.info("whip_publishing", session=session_id)
        await self._status(ws, session_id, "live")
        await publisher.failed.wait()
        if self.publishers.pop(session_id, None) is not None:
            await publisher.stop()
            await self._status(ws, session_id, "failed", ("ice_failed", "connection lost"))

    async def _status(self, ws: ClientConnection, session_id: str, state: str,
                      error: tuple[str, str] | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await _send(ws, protocol.envelope(
                "publish.status", session_id=session_id, state=state,
                error={"code": error[0], "message": error[1]} if error else None))

    async def _stop_publishing(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        publishers, self.publishers = list(self.publishers.values()), {}
        await asyncio.gather(*(p.stop() for p in publishers), return_exceptions=True)

    async def _report_usage(self, ws: ClientConnection) -> None:
        """Send access events in acknowledged batches, at most one outstanding."""
        while True:
            try:
                await self._report_usage_once(ws)
            except ConnectionClosed:
                return  # the session is ending; the next one resumes from the last ack
            except Exception as exc:  # a busy database: try again, never lose the task
                log.warning("relay_usage_delayed", error=str(exc))
                await asyncio.sleep(USAGE_EVERY)

    async def _report_usage_once(self, ws: ClientConnection) -> None:
        while True:
            after = await asyncio.to_thread(self._store.usage_sent_through)
            outstanding = await asyncio.to_thread(self._store.usage_outstanding)
            # A batch once sent is pinned to its seq range until acknowledged: entries
            # written since then go in the next batch, never into a renamed resend.
            query = audit.AuditQuery(after_seq=after, limit=protocol.USAGE_BATCH,
                                     before_seq=None if outstanding is None
                                     else outstanding + 1)
            entries = await asyncio.to_thread(self._store.read,
                                              lambda c, q=query: audit.query(c, q))
            message = protocol.usage_batch(entries)
            if message is None:
                if entries:  # nothing to report in this stretch: move past it
                    await asyncio.to_thread(self._store.mark_usage_sent, entries[-1]["seq"])
                    continue
                await asyncio.sleep(USAGE_EVERY)
                continue
            if outstanding is None:
                await asyncio.to_thread(self._store.mark_usage_outstanding, entries[-1]["seq"])
            waiter: asyncio.Future[Acked] = asyncio.get_running_loop().create_future()
            self._acks[message["id"]] = waiter
            await _send(ws, message)
            try:
                acked = await asyncio.wait_for(waiter, USAGE_ACK_TIMEOUT)
            except TimeoutError:
                self._acks.pop(message["id"], None)
                continue  # sent again (same batch name) on the next round
            if acked.ok:
                await asyncio.to_thread(self._store.mark_usage_sent, entries[-1]["seq"])
            else:
                await asyncio.sleep(USAGE_EVERY)

    async def _applied(self) -> None:
        await self._access.refresh(force=True)
        self._access.sweep()

    async def _report_inventory(self, ws: ClientConnection) -> None:
        """cameras.update whenever a camera's state, format or audio changes."""
        last = {c["id"]: c for c in self._inventory()}
        while True:
            await asyncio.sleep(INVENTORY_EVERY)
            now = {c["id"]: c for c in self._inventory()}
            changed = [c for cid, c in now.items() if last.get(cid) != c]
            removed = [cid for cid in last if cid not in now]
            if changed or removed:
                await _send(ws, protocol.envelope("cameras.update", cameras=changed,
                                                  removed=removed))
            last = now


async def _send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message, separators=(",", ":")))


def rejection_of(exc: InvalidStatus) -> Exception:
    response = exc.response
    try:
        body = json.loads(bytes(response.body or b"").decode() or "{}")
    except ValueError:
        body = {}
    code = body.get("error") if isinstance(body, dict) else None
    if response.status_code in (401, 403, 426) and code in TOKEN_REJECTIONS:
        return Rejected(code, str(body.get("message") or code))
    if response.status_code == 401:
        return Rejected("token_invalid")
    return OSError(f"the relay answered HTTP {response.status_code}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd else 1006
        return f"connection closed ({code} {CLOSE_REASONS.get(code, '')})".strip()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def camera_inventory(cameras: Any) -> Callable[[], list[dict[str, Any]]]:
    """hello/cameras.update entries (§1.3): no source URL, no credentials."""
    def build() -> list[dict[str, Any]]:
        out = []
        for camera in cameras:
            s = camera.hub.status
            out.append({"id": camera.id, "name": camera.name, "state": s.state, "error": s.error,
                        "video": {"codec": s.codec, "width": s.width, "height": s.height,
                                  "fps": s.fps} if s.codec else None,
                        "audio": {"codec": s.audio.lower()} if s.audio else None})
        return out
    return build
