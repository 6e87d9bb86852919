"""The access service the daemon's protocols call: authorize, hold sessions, end them.

It keeps the token index in memory (so ``authorize`` never touches the disk), follows the
store for changes made anywhere (CLI, admin API, relay sync) as they are written (inotify,
``agent.state.changes``; where that is unavailable, a look every ``poll_interval``), and
ends live sessions whose token was revoked or expired at once. Nothing wakes it while the
store is not written and no live session's token has a deadline (an idle agent's CPU).

Durability promise: ``authorize`` returns a grant only once its ``access.granted`` entry (and
usage count) is committed, so a response sent under a grant is in the audit log even if the
agent is killed right after. Denials and ``session.ended`` entries are batched (every
``audit.flush_interval``): a crash can lose the last second of them, a clean stop does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable

import structlog

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.denials import stored_camera
from agent.access.index import Row, TokenIndex
from agent.access.model import Action, Protocol, TokenRecord
from agent.access.policy import (
    AccessRequest,
    Decision,
    FailureLimiter,
    Reason,
    Site,
    authorize,
)
from agent.access.recorder import AccessRecorder
from agent.access.sessions import (
    Admission,
    Session,
    SessionLimitReached,
    SessionLimits,
    SessionRegistry,
)
from agent.access.store import TokenStore
from agent.beat import until_beat
from agent.state.changes import StoreChanges
from agent.stopping import cancel_and_wait

log = structlog.get_logger(__name__)

PRUNE_EVERY = 3600.0
FULL_POLL = 5.0  # query the store at least this often, even if its files look unchanged
REFRESH_GAP = 0.05
#: A run of passes for writes alone (no request waiting) comes at most this often: under
#: load the agent's own audit commits write the store thousands of times a second.
WRITE_GAP = 0.2
#: While sessions are live, the watcher sweeps on this beat even with no deadline due (a
#: wall-clock step moves expiries against the event loop's clock): every 1 s, the first
#: sweep after a pass up to 1.1 s later (agent/beat.py).
SWEEP_EVERY = 1.0
#: The longest a failed well-formed token waits for the watcher's next look at the store.
LOOK_WAIT = 2.0
#: Outcomes that a store change made elsewhere (CLI, relay sync) may turn into a grant.
_LOOK_AGAIN = frozenset({Reason.UNKNOWN, Reason.BAD_SECRET})
APPLY_SLICE = 2000  # records indexed per event-loop step by refresh()
#: How long a grant waits for its audit entry to reach the disk. The daemon survives a
#: failing disk (it keeps serving, loudly): past this, the request goes on unrecorded.
DURABLE_WAIT = 2.0
#: Once a write has failed (a full disk), grants wait this long at most: viewers are not held
#: for seconds while the disk is being fixed. Their entries stay queued (and the recorder's
#: reserve file makes room for them), so no acknowledged grant is lost.
FAILING_WAIT = 0.05


class AccessService:
    """``authorize`` for every protocol, and the live-session registry it guards."""

    def __init__(
        self,
        store: TokenStore,
        recorder: AccessRecorder,
        limiter: FailureLimiter,
        *,
        retention_days: int,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.time,
        session_limits: SessionLimits | None = None,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._limiter = limiter
        self._site: Site = store.site
        self._retention = retention_days * 86400.0
        self._poll = poll_interval
        self._clock = clock
        self._tokens = TokenIndex()
        self._rev = 0
        self.sessions = SessionRegistry(session_limits)
        self._refreshing: asyncio.Future[None] | None = None
        #: For /metrics: decisions by reason, bytes of sessions that have ended.
        self.decisions: Counter[str] = Counter()
        self.bytes_ended = 0
        self._refreshed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._audit_lagging = False
        # The watcher's passes, for requests waiting on a fresh look (``_fresh_index``).
        self._wake = asyncio.Event()
        self._pass_done = asyncio.Event()
        self._passes_started = 0
        self._passes_done = 0
        self._published: dict[str, int] = {}
        self._changes: StoreChanges | None = None
        self._written = False  # the store's files were written since the last pass looked
        self._asked = False  # a request (or a new session) waits for the next pass
        #: Set after each watcher pass that read the store (for the daemon's other readers
        #: of the database, such as the adopted cameras).
        self.store_read = asyncio.Event()

    async def start(self) -> None:
        self._tokens, self._rev = await asyncio.to_thread(self._load)
        # Counts a previous run left (killed) are stale: none of its sessions lives on.
        await asyncio.to_thread(self._store.publish_live_sessions, {}, self._clock())
        self._recorder.start()
        self._changes = StoreChanges.open(self._store.path, self._store_written)
        self._task = asyncio.create_task(self._watch(), name="token-watch")
        log.info("access_ready", tokens=len(self._tokens))

    def _load(self) -> tuple[TokenIndex, int]:
        rows, rev = self._store.load_rows()
        return TokenIndex(rows), rev

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._changes is not None:
            self._changes.close()
            self._changes = None
        for session in self.sessions:
            self.end_session(session.id, "shutdown")
            self._close_quietly(session, "shutdown")
        await self._publish_live({})
        await asyncio.to_thread(self._recorder.close)

    async def flush(self) -> None:
        """Wait until every access event recorded so far is committed."""
        await asyncio.to_thread(self._recorder.flush)

    async def authorize(
        self, token: str | None, camera: str | None, protocol: Protocol | None,
        peer_ip: str | None, *, action: Action = Action.VIEW, opens_session: bool = False,
    ) -> Decision:
        """Decide one request and record it: the one method every handler calls.

        A grant returns only once its audit entry is committed (the durability promise
        above). ``action``: ``VIEW`` names its ``protocol``; ``LIST`` and ``ADMIN`` pass
        None. A well-formed token that is ``unknown`` or has a ``bad_secret`` waits for the
        store watcher's next look (woken now, so a token created on the CLI a moment ago
        works at once) and is decided again. Both outcomes take that same wait, and nothing
        on the request path reads the store: whether a token id exists here does not show in
        the time of the answer (it did: 1.94 ms against 1.30 ms). ``opens_session``: the
        request starts a live session (a WHEP offer, an RTSP PLAY, an HLS playlist), so the
        token's session cap applies (``session_limit``, 429)."""
        req = AccessRequest(token, camera, action, protocol, peer_ip, self._clock())
        decision = authorize(req, self._tokens, self._site)  # the limiter is not spent yet
        if decision.reason in _LOOK_AGAIN:
            await self._fresh_index()
        if not decision.granted:  # decided again, now spending the limiter on a failure
            decision = authorize(req, self._tokens, self._site, self._limiter)
        decision = self._session_cap(decision, opens_session)
        ticket = self._record(req, decision)
        if decision.granted:
            await self._durable(ticket)
        return decision

    async def _fresh_index(self) -> None:
        """Wait (at most ``LOOK_WAIT``) until a watcher pass that starts after this call has
        applied the store's changes. Without a running watcher (tests, tools): one refresh."""
        if self._task is None:
            await self.refresh(force=True)
            return
        target = self._passes_started + 1
        self._ask()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOOK_WAIT
        while self._passes_done < target:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._pass_done.wait(), remaining)
            except TimeoutError:
                return

    async def _durable(self, ticket: int) -> None:
        """Wait (bounded) until the event with ``ticket`` is committed."""
        wait = FAILING_WAIT if self._recorder.failing else DURABLE_WAIT
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._recorder.durable(ticket)), wait)
        except TimeoutError:
            if not self._audit_lagging:
                log.error("audit_not_durable", waited_s=wait,
                          fix="the state database cannot be written: check the disk")
            self._audit_lagging = True
        else:
            self._audit_lagging = False

    async def refresh(self, force: bool = False) -> None:
        """Apply the store's changes now (one query; concurrent callers share it).
        ``force``: after a change this process just made, a read that began before it
        does not count."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            if not force:
                return
        if not force and time.monotonic() - self._refreshed_at < REFRESH_GAP:
            return
        if self._refreshing is not None:  # another forced caller got there first
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        self._refreshing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            changed, rev = await asyncio.to_thread(self._store.changes_since, self._rev)
            # A relay sync can change 100,000 records: index them a slice at a time so the
            # event loop keeps its 50 ms promise (docs/relay-protocol.md 1.2).
            for start in range(0, len(changed), APPLY_SLICE):
                if start:
                    await asyncio.sleep(0)
                self.apply_changes(changed[start:start + APPLY_SLICE])
            self._rev = rev
        except asyncio.CancelledError:
            self._refreshing.cancel()
            raise
        except Exception as exc:
            self._refreshing.set_exception(exc)
            raise
        else:
            self._refreshing.set_result(None)
        finally:
            self._refreshed_at = time.monotonic()
            self._refreshing = None

    def _session_cap(self, decision: Decision, opens_session: bool) -> Decision:
        if (opens_session and decision.granted and decision.record is not None
                and not self.sessions.admits(decision.record)):
            # A valid token at its cap: not a failed attempt, so no failure budget spent.
            return Decision(Reason.SESSION_LIMIT, decision.token_id, decision.record)
        return decision

    def _record(self, req: AccessRequest, decision: Decision) -> int:
        ticket = self._recorder.record_decision(req, decision)
        camera, protocol, peer_ip = req.camera, req.recorded_protocol, req.peer_ip
        self.decisions[decision.reason.value] += 1
        if not decision.granted:
            log.debug("access_denied", reason=decision.reason.value, token_id=decision.token_id,
                      camera=stored_camera(camera), protocol=protocol, peer_ip=peer_ip)
        return ticket

    def open_session(
        self,
        decision: Decision,
        camera: str | None,
        protocol: str,
        peer_ip: str | None,
        close: Callable[[str], None],
        bytes_sent: Callable[[], int] = lambda: 0,
        session_id: str | None = None,
        admission: Admission | None = None,
        pending: bool = False,
    ) -> Session:
        """Register a live session for a granted decision; it ends when its token does.
        ``session_id``: the protocol's own id, so logs and the audit log name it alike.
        ``admission``: the place ``sessions.admit`` held for it. ``pending``: still
        connecting (until ``sessions.connected``).

        Raises SessionLimitReached (audited as a ``session_limit`` denial) when sessions of
        the same token opened meanwhile took the last place under its cap: the caller ends
        what it prepared and answers 429."""
        if not decision.granted or decision.token_id is None:
            raise ValueError("a session needs a granted decision")
        session = Session(session_id or uuid.uuid4().hex, decision.token_id, camera, protocol,
                          peer_ip, self._clock(), close, bytes_sent, pending)
        record = self._tokens.get(decision.token_id, decision.record)
        try:
            self.sessions.add(session, record, admission)
        except SessionLimitReached:
            denied = Decision(Reason.SESSION_LIMIT, decision.token_id, record)
            self._recorder.record_decision(AccessRequest(
                None, camera, Action.VIEW, Protocol(protocol), peer_ip, self._clock()), denied)
            self.decisions[denied.reason.value] += 1
            raise
        self._ask()  # a pass: publish the count, and wake at its token's deadline
        return session

    def end_session(self, session_id: str, why: str) -> None:
        """Forget a session and audit its end (duration and bytes). Idempotent."""
        session = self.sessions.remove(session_id)
        if session is not None:
            self._audit_end(session, why)

    def _audit_end(self, session: Session, why: str) -> None:
        now = self._clock()
        sent = session.bytes_sent()
        self.bytes_ended += sent
        self._recorder.record(AuditEntry(
            now, audit.SESSION_ENDED, token_id=session.token_id, camera=session.camera,
            protocol=session.protocol, peer_ip=session.peer_ip, reason=why,
            detail={"duration_s": round(now - session.started_at, 3),
                    "bytes": sent, "session": session.id},
        ))

    def sweep(self) -> int:
        """End the sessions whose token is no longer valid; returns how many ended."""
        ended = self.sessions.sweep(self._tokens, self._clock())
        for session, reason in ended:
            self._audit_end(session, reason.value)
            self._close_quietly(session, reason.value)
            log.info("session_ended", session=session.id, token_id=session.token_id,
                     reason=reason.value)
        return len(ended)

    @staticmethod
    def _close_quietly(session: Session, reason: str) -> None:
        try:
            session.close(reason)
        except Exception as exc:  # one broken session must not stop the others from ending
            log.warning("session_close_failed", session=session.id, error=str(exc))

    def token(self, token_id: str) -> TokenRecord | None:
        """The record as the service currently enforces it."""
        return self._tokens.get(token_id)

    def apply_changes(self, rows: list[Row]) -> None:
        """Take the store's changed rows (compact, agent.access.index) into the index."""
        for token_id in self._tokens.apply(rows):
            # The store refuses this already; enforcement never relies on one guard.
            log.error("token_unrevoke_ignored", token_id=token_id)

    def _store_signature(self) -> tuple[int, ...]:
        """Sizes and times of the database files: any commit, by any process, changes them.
        A few stat() calls, cheap enough for the event loop, spare a query every poll."""
        out: list[int] = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self._store.path}{suffix}")
            except OSError:
                out += [0, 0]
            else:
                out += [st.st_mtime_ns, st.st_size]
        return tuple(out)

    def _store_written(self) -> None:
        """inotify: a process wrote the database."""
        self._written = True
        self._wake.set()

    def _ask(self) -> None:
        self._asked = True
        self._wake.set()

    async def _space(self, after_writes: float, after_ask: float) -> None:
        """Wait (loop time) until the next pass may start: ``after_ask`` once a request
        waits for it, else ``after_writes``."""
        loop = asyncio.get_running_loop()
        while (left := (after_ask if self._asked else after_writes) - loop.time()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()

    def _next_look(self, failing: bool) -> float:
        """Seconds the watcher may wait for a wake-up before it must look again: at once at
        the next deadline of a live session's token, else at the next full poll. Without
        inotify (or while the store fails), every ``poll_interval``."""
        if self._changes is None or not self._changes.alive or failing:
            return self._poll
        wait = FULL_POLL
        if len(self.sessions):
            now = self._clock()
            wait = until_beat(SWEEP_EVERY)  # with the other periodic work: one wake-up
            for session in self.sessions:
                record = self._tokens.get(session.token_id)
                for deadline in (record.expires_at, record.revoked_at) if record else ():
                    if deadline is not None and deadline > now:
                        wait = min(wait, deadline - now)
        return wait

    async def _watch(self) -> None:
        last_prune = 0.0
        failing = False
        seen: tuple[int, ...] = ()
        last_query = 0.0
        streak = 0  # passes in a row for writes alone
        loop = asyncio.get_running_loop()
        while True:
            self._passes_started += 1
            started = loop.time()
            asked, self._asked = self._asked, False
            written, self._written = self._written, False
            try:
                if self._changes is not None:
                    written = self._changes.rearm() or written
                streak = streak + 1 if written and not asked else 0
                signature = self._store_signature()
                now = time.monotonic()
                if written or signature != seen or now - last_query > FULL_POLL or failing:
                    seen, last_query = signature, now
                    await self.refresh(force=True)  # one store reader at a time
                    self.store_read.set()
                if self._clock() - last_prune > PRUNE_EVERY:
                    last_prune = self._clock()
                    await asyncio.to_thread(self._prune, last_prune)
                if failing:
                    log.info("token_store_recovered")
                failing = False
            except Exception as exc:  # keep enforcing from the last known index
                if not failing:
                    log.error("token_store_unreadable", error=str(exc))
                failing = True
            self._passes_done = self._passes_started
            done, self._pass_done = self._pass_done, asyncio.Event()
            done.set()
            self.sweep()
            await self._publish_live(self.sessions.per_token())
            # One timer per pass: an idle agent wakes only for writes and the full poll.
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(REFRESH_GAP, self._next_look(failing))):
                    woken = await self._wake.wait()
            if woken:
                await self._space(started + (WRITE_GAP if streak > 1 else REFRESH_GAP),
                                  started + REFRESH_GAP)
            self._wake.clear()

    async def _publish_live(self, counts: dict[str, int]) -> None:
        """Share the live sessions per token with the CLI ('token check' shows them, and
        says session_limit at the cap); written only when they change."""
        if counts == self._published:
            return
        try:
            await asyncio.to_thread(self._store.publish_live_sessions, counts, self._clock())
        except Exception as exc:  # informational only: never stop enforcing for it
            log.warning("live_sessions_not_published", error=str(exc))
        else:
            self._published = counts

    def _prune(self, now: float) -> None:
        before = now - self._retention

        def work(conn: sqlite3.Connection) -> None:
            audit.prune(conn, before, now, actor="retention")
            usage.prune(conn, before)

        self._store.write(work)
