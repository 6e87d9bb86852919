"""Batched writing of access events (audit entries + usage counters), off the event loop.

``record_*`` only appends to a list under a lock, so it is safe and cheap to call from the
event loop; a writer thread commits everything pending in one transaction per interval.
``durable(ticket)`` asks for one event to be on disk: the writer commits at once, together
with whatever else is pending (group commit), so a granted request can be answered only
after its audit entry would survive a crash, without a transaction per request.
Memory is bounded: past ``max_pending`` events, further ones are counted and written as a
single ``audit.overflow`` entry instead of being kept one by one.

Disk is bounded too: denials are folded per (source IP, reason) over ``denial_window``
(``denials.DenialFolder``), stored camera ids are cut to a valid id's length, and past
``max_bytes`` of database denials are no longer written one by one but counted in one
``audit.suppressed`` entry per window — grants and token changes are always written.
A full disk must not lose an acknowledged grant: a reserve file of ``RESERVE_BYTES`` is kept
next to the database and given up the first time a write fails for lack of space, so the
grants waiting to be written still fit; doctor reports it missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import structlog

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.denials import DenialFolder, stored_camera
from agent.access.policy import AccessRequest, Decision
from agent.access.usage import UsageEvent
from agent.errors import StoreError
from agent.state.db import connect, transaction

log = structlog.get_logger(__name__)

OVERFLOW = "audit.overflow"
SUPPRESSED = "audit.suppressed"
#: Room kept free for the audit log on the state filesystem (about 10,000 grants).
RESERVE_BYTES = 4 * 1024 * 1024
RESERVE_NAME = "audit.reserve"
#: How often the writer tries to take its reserve back after giving it up.
RESERVE_RETRY = 60.0

# One pending item: an entry to write (None: a usage count only), its usage event, and how
# many recorded events (tickets) it stands for: 0 for a row summing folded denials.
_Item = tuple[AuditEntry | None, UsageEvent | None, int]


class AccessRecorder:
    """Collects access events and writes them in batches from its own thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_ips: int,
        flush_interval: float = 1.0,
        max_pending: int = 100_000,
        denial_window: float = 60.0,
        max_bytes: int | None = None,
        reserve: bool = False,
    ) -> None:
        self._path = path
        self._max_ips = max_ips
        self._interval = flush_interval
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[_Item] = []
        self._overflowed = 0
        self._folder = DenialFolder(denial_window)
        self._folded = 0  # denials folded since the last commit (they count as written)
        self._drain_folds = False
        self._max_bytes = max_bytes
        #: The database (with its WAL) has reached ``max_bytes``: denials are only counted.
        self.over_quota = False
        self._suppressed = 0
        self._suppressed_at = 0.0
        #: The last write failed (a full or broken disk): grants do not wait for it long.
        self.failing = False
        self.reserve_path = path.parent / RESERVE_NAME if reserve else None
        self._reserve_tried = 0.0
        self._wake = threading.Event()
        self._dozing = False  # the writer sleeps until an event is recorded (``_doze``)
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

    def record(self, entry: AuditEntry, event: UsageEvent | None = None,
               known_token: bool = False) -> int:
        """Queue one event; returns its ticket (see ``durable``). ``known_token``: a denial
        of a token that exists here (folded per token, see ``denials``)."""
        with self._lock:
            self._recorded += 1
            kept, closed = self._folder.offer(entry, time.monotonic(), known_token)
            self._pending += [(row, None, 0) for row in closed]
            if len(self._pending) >= self._max_pending:
                self._overflowed += 1
            elif kept is None:
                self._folded += 1
                if event is not None:  # the usage counters still count every request
                    self._pending.append((None, event, 0))
            else:
                self._pending.append((kept, event, 1))
            ticket, wake, self._dozing = self._recorded, self._dozing, False
        if wake:
            self._wake.set()
        return ticket

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
            camera=stored_camera(req.camera),
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
        return self.record(entry, event, known_token=decision.record is not None)

    # -- the writer ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-recorder", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything recorded before this call is committed (denials folded
        in open windows included: their rows are written now)."""
        if self._thread is None:
            self._write_pending(drain=True)
            return True
        with self._lock:
            self._drain_folds = True
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
            self._write_pending(drain=True)

    def _run(self) -> None:
        conn = connect(self._path)
        self._keep_reserve()
        try:
            while True:
                woken = self._wake.wait(self._interval)
                self._wake.clear()
                with self._lock:
                    target = self._requested_batches
                    drain, self._drain_folds = self._drain_folds, False
                wrote = self._write_pending(conn, drain=drain)
                with self._lock:
                    self._written_batches = max(self._written_batches, target)
                    self._done.notify_all()
                if self._stopping:
                    self._write_pending(conn, drain=True)
                    return
                if self.reserve_path is not None and not self.failing:
                    self._keep_reserve()
                if not woken and not wrote:  # a whole interval without an event
                    self._doze()
        finally:
            conn.close()

    def _doze(self) -> None:
        """After an interval without events, with nothing to write and no folded denials to
        close, sleep until an event is recorded (it then waits the interval like any batch)
        instead of waking every interval for nothing (docs/field-notes.md, idle CPU); the
        reserve is still looked after every RESERVE_RETRY. ``durable``, ``flush`` and
        ``close`` wake it at once. (Dozing after every write cost a grant storm a thread
        wake-up per grant: record() woke the writer, then durable() again.)"""
        with self._lock:
            if (self._pending or self._overflowed or self._folded or self._folder.folded
                    or self.failing or self._waiters or self._stopping
                    or self._requested_batches > self._written_batches):
                return
            self._dozing = True
        self._wake.wait(RESERVE_RETRY)
        with self._lock:  # (under the lock: a durable() or flush() now keeps its wake-up)
            self._dozing = False
            if not (self._waiters or self._stopping
                    or self._requested_batches > self._written_batches):
                self._wake.clear()

    def _write_pending(self, conn: sqlite3.Connection | None = None, drain: bool = False) -> bool:
        """Commit what is pending; False if there was nothing to write."""
        with self._lock:
            batch, self._pending = self._pending, []
            batch += [(row, None, 0) for row in self._folder.due(time.monotonic(), drain)]
            overflowed, self._overflowed = self._overflowed, 0
            folded, self._folded = self._folded, 0
        if not batch and not overflowed:
            if folded:
                self._committed_more(folded)
            return False
        entries = self._rows(batch, overflowed)
        db = conn if conn is not None else connect(self._path)
        try:
            try:
                self._commit(db, entries, batch)
            except (sqlite3.OperationalError, StoreError) as exc:  # (db.transaction wraps)
                if not self._release_reserve(exc):
                    raise
                self._commit(db, entries, batch)  # the grants fit in the room just freed
            self._committed_more(sum(n for _, _, n in batch) + overflowed + folded)
            self.failing = False
        except Exception as exc:  # the daemon must survive a full disk; say so loudly
            if not self.failing:
                log.error("audit_write_failed", error=str(exc), entries=len(entries))
            self.failing = True
            self._requeue(batch, overflowed, folded)
        finally:
            if conn is None:
                db.close()
        self._check_quota()
        return True

    def _rows(self, batch: list[_Item], overflowed: int) -> list[AuditEntry]:
        """The entries to write; past the quota, denials become one count per window."""
        entries = [entry for entry, _, _ in batch if entry is not None]
        if self.over_quota:
            kept = [e for e in entries if e.event != audit.DENIED]
            self._suppressed += sum(int(e.detail.get("count", 1))
                                    for e in entries if e.event == audit.DENIED)
            entries = kept
            now = time.monotonic()
            if self._suppressed and now - self._suppressed_at >= self._folder.window:
                entries.append(AuditEntry(time.time(), SUPPRESSED, detail={
                    "denials": self._suppressed, "why": "audit.max_size_mb reached"}))
                self._suppressed, self._suppressed_at = 0, now
        if overflowed:
            entries.append(AuditEntry(entries[-1].ts if entries else time.time(), OVERFLOW,
                                      detail={"dropped": overflowed}))
        return entries

    def _commit(self, db: sqlite3.Connection, entries: list[AuditEntry],
                batch: list[_Item]) -> None:
        with transaction(db):
            audit.append(db, entries)
            usage.apply(db, [e for _, e, _ in batch if e is not None], self._max_ips)

    def _requeue(self, batch: list[_Item], overflowed: int, folded: int) -> None:
        """After a failed write: keep grants and token events for the next attempt (within
        the bound); denials are dropped first, counted in the ``audit.overflow`` entry."""
        keep: list[_Item] = []
        dropped = 0
        for item in batch:
            if item[0] is not None and item[0].event == audit.DENIED:
                dropped += item[2]
            else:
                keep.append(item)
        with self._lock:
            room = max(0, self._max_pending - len(self._pending))
            self._pending[:0] = keep[:room]
            self._overflowed += overflowed + dropped + sum(n for _, _, n in keep[room:])
            self._folded += folded

    # -- space --------------------------------------------------------------------------------

    def _check_quota(self) -> None:
        if self._max_bytes is None:
            return
        size = database_bytes(self._path)
        over = size >= self._max_bytes
        if over and not self.over_quota:
            log.error("audit_quota_reached", size_mb=round(size / 2**20, 1),
                      max_mb=round(self._max_bytes / 2**20, 1),
                      fix="denials are now only counted: lower audit.retention_days or raise "
                          "audit.max_size_mb")
        self.over_quota = over

    def _keep_reserve(self) -> None:
        """Create the reserve file if it is missing and the disk has room (tried at most
        every ``RESERVE_RETRY`` s)."""
        path = self.reserve_path
        now = time.monotonic()
        if path is None or now - self._reserve_tried < RESERVE_RETRY:
            return
        self._reserve_tried = now
        try:
            if path.exists() and path.stat().st_size >= RESERVE_BYTES:
                return
            if shutil.disk_usage(path.parent).free < 3 * RESERVE_BYTES:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * RESERVE_BYTES)  # real blocks: tmpfs and ext4 alike
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("audit_reserve_unavailable", error=str(exc))
            with contextlib.suppress(OSError):
                path.unlink()

    def _release_reserve(self, exc: Exception) -> bool:
        """The disk is full: give up the reserve so the pending grants can be written."""
        path = self.reserve_path
        if path is None or "full" not in str(exc).lower() or not path.exists():
            return False
        with contextlib.suppress(OSError):
            path.unlink()
        log.error("audit_reserve_released", error=str(exc),
                  fix="the state filesystem is full: free space there (see `therelay-agent "
                      "doctor`); the agent keeps serving")
        self._reserve_tried = time.monotonic()
        return True

    def _committed_more(self, count: int) -> None:
        """``count`` more events (in ticket order) are on disk: release their waiters."""
        with self._lock:
            self._committed += count
            ready = [f for t, f in self._waiters if t <= self._committed]
            self._waiters = [(t, f) for t, f in self._waiters if t > self._committed]
        for future in ready:
            with contextlib.suppress(InvalidStateError):  # the waiter gave up meanwhile
                future.set_result(None)


def database_bytes(path: Path) -> int:
    """Bytes the database takes on disk, its write-ahead log included."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
