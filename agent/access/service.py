"""The access service the daemon's protocols call: authorize, hold sessions, end them.

It keeps the token index in memory (so ``authorize`` never touches the disk), follows the
store for changes made anywhere (CLI, admin API, relay sync) every ``poll_interval``, and
ends live sessions whose token was revoked or expired within that interval.

Durability promise: ``check`` returns a grant only once its ``access.granted`` entry (and
usage count) is committed, so a response sent under a grant is in the audit log even if the
agent is killed right after. Denials and ``session.ended`` entries are batched (every
``audit.flush_interval``): a crash can lose the last second of them, a clean stop does not.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import structlog

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.model import TokenRecord
from agent.access.policy import (
    AccessRequest,
    Decision,
    FailureLimiter,
    Reason,
    Site,
    authorize,
)
from agent.access.recorder import AccessRecorder
from agent.access.sessions import Session, SessionLimitReached, SessionRegistry
from agent.access.store import TokenStore
from agent.access.tokens import check as check_format
from agent.stopping import cancel_and_wait

log = structlog.get_logger(__name__)

PRUNE_EVERY = 3600.0
FULL_POLL = 5.0  # query the store at least this often, even if its files look unchanged
REFRESH_GAP = 0.05
APPLY_SLICE = 2000  # records indexed per event-loop step by refresh()
#: How long a grant waits for its audit entry to reach the disk. The daemon survives a
#: failing disk (it keeps serving, loudly): past this, the request goes on unrecorded.
DURABLE_WAIT = 2.0


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
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._limiter = limiter
        self._site: Site = store.site
        self._retention = retention_days * 86400.0
        self._poll = poll_interval
        self._clock = clock
        self._tokens: dict[str, TokenRecord] = {}
        self._rev = 0
        self.sessions = SessionRegistry()
        self._refreshing: asyncio.Future[None] | None = None
        #: For /metrics: decisions by reason, bytes of sessions that have ended.
        self.decisions: Counter[str] = Counter()
        self.bytes_ended = 0
        self._refreshed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._audit_lagging = False
        self._published: dict[str, int] = {}

    async def start(self) -> None:
        self._tokens, self._rev = await asyncio.to_thread(self._store.load_all)
        # Counts a previous run left (killed) are stale: none of its sessions lives on.
        await asyncio.to_thread(self._store.publish_live_sessions, {}, self._clock())
        self._recorder.start()
        self._task = asyncio.create_task(self._watch(), name="token-watch")
        log.info("access_ready", tokens=len(self._tokens))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for session in self.sessions:
            self.end_session(session.id, "shutdown")
            self._close_quietly(session, "shutdown")
        await self._publish_live({})
        await asyncio.to_thread(self._recorder.close)

    async def flush(self) -> None:
        """Wait until every access event recorded so far is committed."""
        await asyncio.to_thread(self._recorder.flush)

    async def check(
        self, token: str | None, camera: str | None, protocol: str, peer_ip: str | None,
        *, opens_session: bool = False,
    ) -> Decision:
        """``authorize``, except that a well-formed id the index has not seen yet first
        triggers one refresh from the store (coalesced, at most every ``REFRESH_GAP`` s):
        a token created on the CLI a moment ago works at once. ``opens_session``: the
        request starts a live session (a WHEP offer, an RTSP PLAY, an HLS playlist), so the
        token's session cap applies (``session_limit``, 429)."""
        if token:
            public_id = check_format(token)
            if isinstance(public_id, str) and public_id not in self._tokens:
                await self.refresh()
        decision, ticket = self._decide(token, camera, protocol, peer_ip, opens_session)
        if decision.granted:
            await self._durable(ticket)
        return decision

    async def _durable(self, ticket: int) -> None:
        """Wait (bounded) until the event with ``ticket`` is committed."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._recorder.durable(ticket)),
                                   DURABLE_WAIT)
        except TimeoutError:
            if not self._audit_lagging:
                log.error("audit_not_durable", waited_s=DURABLE_WAIT,
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

    def authorize(
        self, token: str | None, camera: str | None, protocol: str, peer_ip: str | None
    ) -> Decision:
        """Decide and record one request. Never blocks: safe on the event loop. The audit
        entry is written with the next batch; ``check`` waits for it."""
        return self._decide(token, camera, protocol, peer_ip)[0]

    def _decide(
        self, token: str | None, camera: str | None, protocol: str, peer_ip: str | None,
        opens_session: bool = False,
    ) -> tuple[Decision, int]:
        req = AccessRequest(token, camera, protocol, peer_ip, self._clock())
        decision = authorize(req, self._tokens, self._site, self._limiter)
        if (opens_session and decision.granted and decision.record is not None
                and not self.sessions.admits(decision.record)):
            # A valid token at its cap: not a failed attempt, so no failure budget spent.
            decision = Decision(Reason.SESSION_LIMIT, decision.token_id, decision.record)
        ticket = self._recorder.record_decision(req, decision)
        self.decisions[decision.reason.value] += 1
        if not decision.granted:
            log.debug("access_denied", reason=decision.reason.value, token_id=decision.token_id,
                     camera=camera, protocol=protocol, peer_ip=peer_ip)
        return decision, ticket

    def open_session(
        self,
        decision: Decision,
        camera: str | None,
        protocol: str,
        peer_ip: str | None,
        close: Callable[[str], None],
        bytes_sent: Callable[[], int] = lambda: 0,
        session_id: str | None = None,
    ) -> Session:
        """Register a live session for a granted decision; it ends when its token does.
        ``session_id``: the protocol's own id, so logs and the audit log name it alike.

        Raises SessionLimitReached (audited as a ``session_limit`` denial) when sessions of
        the same token opened meanwhile took the last place under its cap: the caller ends
        what it prepared and answers 429."""
        if not decision.granted or decision.token_id is None:
            raise ValueError("a session needs a granted decision")
        session = Session(session_id or uuid.uuid4().hex, decision.token_id, camera, protocol,
                          peer_ip, self._clock(), close, bytes_sent)
        record = self._tokens.get(decision.token_id, decision.record)
        try:
            self.sessions.add(session, record)
        except SessionLimitReached:
            denied = Decision(Reason.SESSION_LIMIT, decision.token_id, record)
            self._recorder.record_decision(
                AccessRequest(None, camera, protocol, peer_ip, self._clock()), denied)
            self.decisions[denied.reason.value] += 1
            raise
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

    def apply_changes(self, records: list[TokenRecord]) -> None:
        for changed in records:
            record, known = changed, self._tokens.get(changed.id)
            if known is not None and known.revoked_at is not None and (
                    record.revoked_at is None or record.revoked_at > known.revoked_at):
                # The store refuses this already; enforcement never relies on one guard.
                log.error("token_unrevoke_ignored", token_id=record.id)
                record = replace(record, revoked_at=known.revoked_at)
            self._tokens[record.id] = record

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

    async def _watch(self) -> None:
        last_prune = 0.0
        failing = False
        seen: tuple[int, ...] = ()
        last_query = 0.0
        while True:
            try:
                signature = self._store_signature()
                now = time.monotonic()
                if signature != seen or now - last_query > FULL_POLL or failing:
                    seen, last_query = signature, now
                    await self.refresh()  # shared with check(): one store reader at a time
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
            self.sweep()
            await self._publish_live(self.sessions.per_token())
            await asyncio.sleep(self._poll)

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
