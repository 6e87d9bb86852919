"""Batched writing of access events (audit entries + usage counters), off the event loop.

``record_*`` only appends to a list under a lock, so it is safe and cheap to call from the
event loop; a writer thread commits everything pending in one transaction per interval.
``durable(ticket)`` asks for one event to be on disk: the writer commits at once, together
with whatever else is pending (group commit), so a granted request can be answered only
after its audit entry would survive a crash, without a transaction per request.
Memory is bounded: past ``max_pending`` events, further ones are counted and written as a
single ``audit.overflow`` entry instead of being kept one by one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import structlog

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.policy import AccessRequest, Decision
from agent.access.usage import UsageEvent
from agent.state.db import connect, transaction

log = structlog.get_logger(__name__)

OVERFLOW = "audit.overflow"


class AccessRecorder:
    """Collects access events and writes them in batches from its own thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_ips: int,
        flush_interval: float = 1.0,
        max_pending: int = 100_000,
    ) -> None:
        self._path = path
        self._max_ips = max_ips
        self._interval = flush_interval
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[tuple[AuditEntry, UsageEvent | None]] = []
        self._overflowed = 0
        self._wake = threading.Event()
        self._done = threading.Condition(self._lock)
        self._written_batches = 0
        self._requested_batches = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Tickets: the n-th event recorded has ticket n; the first ``_committed`` are on
        #: disk (events folded into an ``audit.overflow`` entry count as written with it).
        self._recorded = 0
        self._committed = 0
        self._waiters: list[tuple[int, Future[None]]] = []

    # -- producers (any thread, including the event loop) --------------------------------

    def record(self, entry: AuditEntry, event: UsageEvent | None = None) -> int:
        """Queue one event; returns its ticket (see ``durable``)."""
        with self._lock:
            self._recorded += 1
            if len(self._pending) >= self._max_pending:
                self._overflowed += 1
            else:
                self._pending.append((entry, event))
            return self._recorded

    def durable(self, ticket: int) -> Future[None]:
        """Done once the event with ``ticket`` is committed; the writer is woken at once.
        Not started (tests, the CLI): written here, synchronously."""
        future: Future[None] = Future()
        with self._lock:
            if self._committed >= ticket:
                future.set_result(None)
                return future
            self._waiters.append((ticket, future))
        if self._thread is None:
            self._write_pending()
        else:
            self._wake.set()
        return future

    def record_decision(self, req: AccessRequest, decision: Decision) -> int:
        """Audit one authorization and count it for its token."""
        entry = AuditEntry(
            req.now,
            audit.GRANTED if decision.granted else audit.DENIED,
            token_id=decision.token_id,
            camera=req.camera,
            protocol=req.recorded_protocol,
            peer_ip=req.peer_ip,
            result="granted" if decision.granted else "denied",
            reason=decision.reason.value,
            detail={"underlying": decision.detail} if decision.detail else {},
        )
        event = None
        if decision.record is not None:
            event = UsageEvent(decision.record.id, req.now, req.recorded_protocol, req.peer_ip,
                               decision.granted)
        return self.record(entry, event)

    # -- the writer ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-recorder", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything recorded before this call is committed."""
        if self._thread is None:
            self._write_pending()
            return True
        with self._lock:
            self._requested_batches += 1
            target = self._requested_batches
            self._wake.set()
            return self._done.wait_for(lambda: self._written_batches >= target, timeout)

    def close(self) -> None:
        """Write what is pending and stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._write_pending()

    def _run(self) -> None:
        conn = connect(self._path)
        try:
            while True:
                self._wake.wait(self._interval)
                self._wake.clear()
                with self._lock:
                    target = self._requested_batches
                self._write_pending(conn)
                with self._lock:
                    self._written_batches = max(self._written_batches, target)
                    self._done.notify_all()
                if self._stopping:
                    self._write_pending(conn)
                    return
        finally:
            conn.close()

    def _write_pending(self, conn: sqlite3.Connection | None = None) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            overflowed, self._overflowed = self._overflowed, 0
        if not batch and not overflowed:
            return
        entries = [entry for entry, _ in batch]
        if overflowed:
            entries.append(AuditEntry(entries[-1].ts if entries else 0.0, OVERFLOW,
                                      detail={"dropped": overflowed}))
        db = conn if conn is not None else connect(self._path)
        try:
            with transaction(db):
                audit.append(db, entries)
                usage.apply(db, [e for _, e in batch if e is not None], self._max_ips)
            self._committed_more(len(batch) + overflowed)
        except Exception as exc:  # the daemon must survive a full disk; say so loudly
            log.error("audit_write_failed", error=str(exc), entries=len(entries))
            with self._lock:  # keep them for the next attempt, within the bound
                room = max(0, self._max_pending - len(self._pending))
                self._pending[:0] = batch[:room]
                self._overflowed += overflowed + len(batch) - min(room, len(batch))
        finally:
            if conn is None:
                db.close()

    def _committed_more(self, count: int) -> None:
        """``count`` more events (in ticket order) are on disk: release their waiters."""
        with self._lock:
            self._committed += count
            ready = [f for t, f in self._waiters if t <= self._committed]
            self._waiters = [(t, f) for t, f in self._waiters if t > self._committed]
        for future in ready:
            with contextlib.suppress(InvalidStateError):  # the waiter gave up meanwhile
                future.set_result(None)
