"""The control channel to TheRelay cloud: a thin pump around :mod:`agent.relay.protocol`.

The rules of docs/relay-protocol.md v1.1 (acks, ids, publish session states, retry
schedule, heartbeat) live in the sans-I/O :class:`~agent.relay.protocol.RelayProtocol`;
this module moves its messages over a WebSocket, applies token records in the store,
runs WHIP publishers and sleeps the delays it decides. The audit log is the durable outbox
of usage: batches are read from it after the last acknowledged seq, so nothing
acknowledged is lost and nothing unacknowledged is forgotten across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidStatus,
)
from websockets.protocol import State

from agent import __version__
from agent.access import audit
from agent.access.service import AccessService
from agent.access.store import TokenStore
from agent.media.hub import CameraHub
from agent.relay import messages, protocol
from agent.relay.messages import Acked, ProtocolError, Publish, Welcome
from agent.relay.protocol import (
    ADVICE,
    WELCOME_TIMEOUT,
    AckReceived,
    Action,
    ApplyRevoke,
    ApplySync,
    Close,
    Closed,
    End,
    Failed,
    LinkState,
    Refused,
    Rejected,
    RelayProtocol,
    Send,
    StartPublish,
    StopPublish,
    refusal_reason,
)
from agent.state.outbox import RelayOutbox
from agent.webrtc import stack

if TYPE_CHECKING:  # the WebRTC stack loads with the first publish (agent/webrtc/stack.py)
    from aiortc import RTCConfiguration

    from agent.webrtc.whip import WhipPublisher

__all__ = ["ADVICE", "CLOCK_SKEW_WARN", "LinkState", "Rejected", "RelayLink",
           "camera_inventory", "rejection_of"]

log = structlog.get_logger(__name__)

INVENTORY_EVERY = 2.0
CLOCK_SKEW_WARN = 30.0
USAGE_EVERY = 5.0  # at most this long between an access and its report (section 1.5)
USAGE_ACK_TIMEOUT = 30.0
SHUTDOWN_REPORT = 2.0  # at most this long to say "stopped" for live sessions at shutdown


#: The GIL's switch interval while the store applies a relay sync in a worker thread
#: (CPython's default: 5 ms). See _responsive_gil().
SYNC_SWITCH_INTERVAL = 0.001


@contextlib.contextmanager
def _responsive_gil() -> Iterator[None]:
    """While worker threads run Python for seconds (the store applying a 100,000-token
    sync, then the access index reading it back), the event loop waits up to the switch
    interval each time it wants the GIL back, several times per loop iteration. 1 ms instead
    of 5 ms took the loop's worst lag during such a sync from 34-53 ms (only the apply
    covered) or 55-105 ms (nothing covered) to 19-25 ms, the sync as fast. Only for that
    time: more thread switches cost the media threads CPU (docs/field-notes.md)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, SYNC_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class RelayLink:
    def __init__(self, url: str, publisher_token: str, agent_id: str, store: TokenStore,
                 outbox: RelayOutbox, access: AccessService,
                 inventory: Callable[[], list[dict[str, Any]]],
                 hubs: Callable[[str], CameraHub | None],
                 ice: Callable[[list[dict[str, Any]]], RTCConfiguration],
                 direct: bool = True) -> None:
        self._url = url
        self._direct = direct  # webrtc.send_path: agent
        self._token = publisher_token
        self._store = store
        self._outbox = outbox
        self._access = access
        self._inventory = inventory
        self._hubs = hubs
        self._ice = ice
        self.protocol = RelayProtocol(agent_id, __version__, lambda cid: hubs(cid) is not None)
        self.publishers: dict[str, WhipPublisher] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: dict[str, asyncio.Task[None]] = {}  # session id → its publisher task
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._acks: dict[str, asyncio.Future[Acked]] = {}

    @property
    def state(self) -> LinkState:
        return self.protocol.state

    @property
    def last_error(self) -> str | None:
        return self.protocol.last_error

    @property
    def welcome(self) -> Welcome | None:
        return self.protocol.welcome

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
                await asyncio.wait_for(asyncio.shield(self._task), 3 + SHUTDOWN_REPORT)
            self._task = None
        await self._stop_publishing()
        self.protocol.state = LinkState.DISCONNECTED

    async def _run(self) -> None:
        while not self._stopping:
            self.protocol.connecting()
            end = await self._connect_once()
            if self._stopping:
                break
            retry = self.protocol.connection_ended(end, time.monotonic())
            await self._stop_publishing()  # the protocol reports them after the next welcome
            await asyncio.sleep(retry.delay)

    async def _connect_once(self) -> End:
        try:
            ws = await connect(
                self._url, subprotocols=[protocol.SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {self._token}"},
                user_agent_header=f"therelay-agent/{__version__}", proxy=None,
                max_size=protocol.MAX_SYNC_MESSAGE, ping_interval=None, open_timeout=10,
                close_timeout=2)
        except InvalidStatus as exc:
            return refused_of(exc)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return Failed(_describe(exc))
        failure: End | None = None
        try:
            await self._session(ws)
        except ConnectionClosed:
            pass
        except (OSError, TimeoutError) as exc:
            failure = Failed(_describe(exc))
        finally:
            with contextlib.suppress(Exception):
                await ws.close(1001 if self._stopping else 1000)
        return failure or closed_of(ws)

    async def _session(self, ws: ClientConnection) -> None:
        cursor = await asyncio.to_thread(self._outbox.relay_cursor)
        await _send(ws, self.protocol.hello(cursor, self._inventory()))
        try:
            first = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
        except TimeoutError:
            await self._perform(ws, self.protocol.no_welcome())
            return
        if not await self._receive(ws, first) or self.protocol.welcome is None:
            return
        welcome = self.protocol.welcome
        skew = round(time.time() - welcome.server_time, 3)
        if abs(skew) > CLOCK_SKEW_WARN:
            log.warning("clock_skew", seconds=skew,
                        fix="this machine's clock differs from the relay's: token expiry "
                            "depends on it; enable NTP (timedatectl set-ntp true)")
        loop = asyncio.get_running_loop()
        helpers = [loop.create_task(self._report_inventory(ws)),
                   loop.create_task(self._report_usage(ws)),
                   loop.create_task(self._heartbeat(ws))]
        try:
            async for text in _messages(ws):
                if self._stopping or not await self._receive(ws, text):
                    break
        finally:
            for task in helpers:
                task.cancel()
            self._acks.clear()  # their messages are answered on the next connection, if ever
            if self._stopping:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._shutdown_report(ws), SHUTDOWN_REPORT)

    async def _receive(self, ws: ClientConnection, text: str | bytes) -> bool:
        """One frame from the relay; False once the agent closed the connection."""
        steps = protocol.parse_steps(text)
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    event = done.value
                    break
                await asyncio.sleep(0)  # a big tokens.sync: let the rest of the agent run
        except ProtocolError as exc:
            return await self._perform(ws, self.protocol.protocol_error(exc))
        return await self._perform(ws, self.protocol.handle(event, time.monotonic()))

    async def _perform(self, ws: ClientConnection, actions: list[Action]) -> bool:
        for action in actions:
            if isinstance(action, Send):
                await _send(ws, action.message)
            elif isinstance(action, Close):
                await ws.close(action.code, action.reason)
                return False
            elif isinstance(action, ApplySync):
                try:
                    await self._apply_sync(ws, action)
                finally:  # a big sync's records are freed a chunk at a time
                    while action.event.tokens.discard(messages.CHUNK * 8):
                        await asyncio.sleep(0)
            elif isinstance(action, ApplyRevoke):
                event = action.event
                known = await asyncio.to_thread(self._store.revoke_relay, event.token_id,
                                                event.revoked_at, time.time())
                await self._applied()  # live sessions under it end now
                log.info("relay_token_revoked", token_id=event.token_id, known=known)
                await self._perform(ws, self.protocol.revoke_applied(event))
            elif isinstance(action, StartPublish):
                self._start_publisher(ws, action.event)
            elif isinstance(action, StopPublish):
                task = self._sessions.pop(action.session_id, None)
                if task is not None:  # it may be half-way through its POST: end that too
                    task.cancel()
                publisher = self.publishers.pop(action.session_id, None)
                if publisher is not None:
                    await publisher.stop()
                await self._perform(ws, self.protocol.publish_state(
                    action.session_id, "stopped", action.error))
            elif isinstance(action, AckReceived):
                waiter = self._acks.pop(action.event.message_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(action.event)
        return True

    async def _apply_sync(self, ws: ClientConnection, action: ApplySync) -> None:
        event = action.event
        with _responsive_gil():  # the store's thread applies, then the index reloads
            try:
                result = await asyncio.to_thread(self._store.apply_relay_sync, event.tokens,
                                                  full=event.full, cursor=event.cursor,
                                                  now=time.time())
            except Exception as exc:  # a busy or broken database: say so, the relay resends
                log.warning("relay_tokens_sync_failed", error=str(exc))
                await self._perform(ws, self.protocol.sync_failed(event, "the agent could not "
                                                                         "store the tokens"))
                return
            await self._applied()
        for refusal in result.refused:
            if refusal.new:  # audited at the same time; a repeat is only in the ack
                log.warning("relay_sync_refused", token_id=refusal.token_id,
                            reason=refusal.code, detail=refusal.message)
        log.info("relay_tokens_synced", full=event.full, tokens=len(event.tokens),
                 changed=result.changed, refused=len(result.refused), cursor=event.cursor)
        await self._perform(ws, self.protocol.sync_applied(event, refused=[
            {"token_id": r.token_id, "code": r.code, "message": r.message}
            for r in result.refused]))

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """WebSocket ping frames every heartbeat_s; no pong within heartbeat_s: close (1.4)."""
        while True:
            await asyncio.sleep(self.protocol.heartbeat_s)
            try:
                waiter = await ws.ping()
                await asyncio.wait_for(waiter, self.protocol.heartbeat_s)
            except ConnectionClosed:
                return
            except TimeoutError:
                await self._perform(ws, self.protocol.heartbeat_lost())
                return

    def _start_publisher(self, ws: ClientConnection, event: Publish) -> None:
        hub = self._hubs(event.camera_id)
        welcome = self.protocol.welcome
        assert welcome is not None
        if hub is None:  # removed since the protocol looked
            self._spawn(self._report(ws, event.session_id, "failed", (
                "unknown_camera", f"no camera {event.camera_id!r} on this agent")))
            return
        sid = event.session_id
        task = self._spawn(self._run_publisher(ws, sid, hub, event, welcome.ice_servers))
        self._sessions[sid] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._sessions.get(sid) is done:
                del self._sessions[sid]
        task.add_done_callback(forget)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _report(self, ws: ClientConnection, session_id: str, state: str,
                      error: tuple[str, str] | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._perform(ws, self.protocol.publish_state(session_id, state, error))

    async def _run_publisher(self, ws: ClientConnection, session_id: str, hub: CameraHub,
                             event: Publish, ice_servers: list[dict[str, Any]]) -> None:
        await self._report(ws, session_id, "starting")
        await stack.load()  # the first publish of this process: a few tenths of a second
        from agent.webrtc.whip import WhipError, WhipPublisher  # noqa: PLC0415 (loaded now)

        publisher = WhipPublisher(hub, event.whip_url, event.bearer or self._token,
                                  self._ice(ice_servers), direct=self._direct)
        self.publishers[session_id] = publisher
        try:
            await publisher.start(timeout=15)
            await asyncio.wait_for(publisher.connected.wait(), 15)
        except Exception as exc:  # WhipError, ICE timeout, or anything aiortc raises
            code = (exc.code if isinstance(exc, WhipError)
                    else "ice_failed" if isinstance(exc, TimeoutError) else "internal")
            log.warning("whip_publish_failed", session=session_id, code=code, error=str(exc))
            self.publishers.pop(session_id, None)
            await publisher.stop()
            await self._report(ws, session_id, "failed", (code, str(exc) or code))
            return
        log.info("whip_publishing", session=session_id)
        await self._report(ws, session_id, "live")
        await publisher.failed.wait()
        if self.publishers.pop(session_id, None) is not None:
            await publisher.stop()
            await self._report(ws, session_id, "failed",
                               ("ice_failed", publisher.failure or "connection lost"))

    async def _shutdown_report(self, ws: ClientConnection) -> None:
        """Section 2: at shutdown, DELETE every session and say ``stopped``."""
        for task in list(self._tasks):
            task.cancel()
        publishers, self.publishers = dict(self.publishers), {}
        await asyncio.gather(*(p.stop() for p in publishers.values()), return_exceptions=True)
        if ws.state is State.OPEN:
            for session_id in publishers:
                await self._report(ws, session_id, "stopped")

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
            after = await asyncio.to_thread(self._outbox.usage_sent_through)
            outstanding = await asyncio.to_thread(self._outbox.usage_outstanding)
            # A batch once sent is pinned to its seq range until acknowledged: entries
            # written since then go in the next batch, never into a renamed resend.
            query = audit.AuditQuery(after_seq=after, limit=messages.USAGE_BATCH,
                                     before_seq=None if outstanding is None
                                     else outstanding + 1)
            entries = await asyncio.to_thread(self._store.read,
                                              lambda c, q=query: audit.query(c, q))
            message = protocol.usage_batch(entries)
            if message is None:
                if entries:  # nothing to report in this stretch: move past it
                    await asyncio.to_thread(self._outbox.mark_usage_sent, entries[-1]["seq"])
                    continue
                await asyncio.sleep(USAGE_EVERY)
                continue
            if outstanding is None:
                await asyncio.to_thread(self._outbox.mark_usage_outstanding, entries[-1]["seq"])
            waiter: asyncio.Future[Acked] = asyncio.get_running_loop().create_future()
            self._acks[message["id"]] = waiter
            await self._perform(ws, [self.protocol.send(message)])
            try:
                acked = await asyncio.wait_for(waiter, USAGE_ACK_TIMEOUT)
            except TimeoutError:
                self._acks.pop(message["id"], None)
                continue  # sent again (same batch name) on the next round
            if acked.ok:
                await asyncio.to_thread(self._outbox.mark_usage_sent, entries[-1]["seq"])
            else:
                await asyncio.sleep(USAGE_EVERY)

    async def _applied(self) -> None:
        await self._access.refresh(force=True)
        self._access.sweep()

    async def _report_inventory(self, ws: ClientConnection) -> None:
        """cameras.update whenever a camera's state, format or audio changes."""
        with contextlib.suppress(ConnectionClosed):  # the session is ending
            while True:
                await asyncio.sleep(INVENTORY_EVERY)
                await self._perform(ws, self.protocol.inventory(self._inventory()))


async def _messages(ws: ClientConnection) -> AsyncIterator[str | bytes]:
    """The relay's messages until it closes normally, as ``async for message in ws`` gives
    them, except that a message sent in fragments (a big tokens.sync, 1 MiB each) is
    decoded one fragment per event-loop step and joined once: websockets decoding 25 MiB
    at once was one step of 30-50 ms (docs/field-notes.md)."""
    while True:
        parts: list[str | bytes] = []
        try:
            async for fragment in ws.recv_streaming():
                parts.append(fragment)
                await asyncio.sleep(0)
        except ConnectionClosedOK:
            return
        message: str | bytes
        if isinstance(parts[0], str):
            message = "".join(p for p in parts if isinstance(p, str))
        else:  # binary: refused by the protocol (4009), whatever it holds
            message = b"".join(p for p in parts if isinstance(p, bytes))
        del parts  # not held (another 25 MiB) while the message is handled
        yield message


async def _send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message, separators=(",", ":")))


def _body_error(exc: InvalidStatus) -> tuple[str | None, str]:
    try:
        body = json.loads(bytes(exc.response.body or b"").decode() or "{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        return None, ""
    code = body.get("error")
    return (code if isinstance(code, str) else None), str(body.get("message") or "")[:200]


def refused_of(exc: InvalidStatus) -> Refused:
    code, message = _body_error(exc)
    return Refused(exc.response.status_code, code, message)


def rejection_of(exc: InvalidStatus) -> Exception:
    """An upgrade refusal as doctor reports it: Rejected, or OSError for the others."""
    refused = refused_of(exc)
    reason = refusal_reason(refused.status, refused.error)
    if reason is not None:
        return Rejected(reason, refused.message or reason)
    return OSError(f"the relay answered HTTP {refused.status}")


def closed_of(ws: ClientConnection) -> Closed:
    """Who closed the connection first, and with which code (1006: nobody did)."""
    proto = ws.protocol
    if proto.close_rcvd is not None and (proto.close_sent is None
                                         or proto.close_rcvd_then_sent):
        return Closed(proto.close_rcvd.code)
    if proto.close_sent is not None:
        return Closed(proto.close_sent.code, by_agent=True)
    return Closed(None)


def _describe(exc: BaseException) -> str:
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
