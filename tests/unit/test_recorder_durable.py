"""``durable(ticket)``: an event is on disk when its future is done, written at once with
whatever else is pending (group commit), never waiting for the flush interval."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.access import audit
from agent.access.audit import AuditEntry
from agent.access.policy import Site
from agent.access.recorder import AccessRecorder
from agent.access.store import TokenStore
from agent.state.database import StateDB
from agent.state.db import connect

T0 = 1_800_000_000.0
NEVER = 3600.0  # a flush interval the test would never see pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TokenStore]:
    s = TokenStore(StateDB(tmp_path / "agent.db"), Site("site1", "acme"), 100, lambda: {"cam1"})
    yield s
    s.close()


def seqs_on_disk(path: Path) -> list[int]:
    conn = connect(path)
    try:
        return [int(r[0]) for r in conn.execute("SELECT seq FROM audit ORDER BY seq")]
    finally:
        conn.close()


def entry(i: int) -> AuditEntry:
    return AuditEntry(T0 + i, audit.GRANTED, token_id="AAAAAAAAAAAA", result="granted",
                      detail={"i": i})


def test_a_durable_event_is_committed_with_everything_before_it(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=10, flush_interval=NEVER)
    recorder.start()
    try:
        tickets = [recorder.record(entry(i)) for i in range(50)]
        assert tickets == list(range(1, 51))
        assert seqs_on_disk(store.path) == []  # batched: nothing written yet
        recorder.durable(tickets[29]).result(timeout=10)  # not the interval: woken now
        on_disk = seqs_on_disk(store.path)
        assert len(on_disk) >= 30  # the 30th and all before it, in one group
        assert recorder.durable(tickets[0]).done()  # already on disk: done at once
        recorder.durable(tickets[-1]).result(timeout=10)
        assert len(seqs_on_disk(store.path)) == 50
    finally:
        recorder.close()
    assert store.read(audit.verify).ok


def test_overflowed_events_count_as_written_with_their_overflow_entry(
        store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=10, flush_interval=NEVER, max_pending=5)
    recorder.start()
    try:
        tickets = [recorder.record(entry(i)) for i in range(8)]  # 3 over the bound
        recorder.durable(tickets[-1]).result(timeout=10)
        events = store.read(lambda c: audit.query(c, audit.AuditQuery(limit=100)))
        assert [e["event"] for e in events] == [audit.GRANTED] * 5 + ["audit.overflow"]
        assert events[-1]["detail"] == {"dropped": 3}
    finally:
        recorder.close()


def test_without_a_writer_thread_durable_writes_in_place(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=10, flush_interval=NEVER)
    ticket = recorder.record(entry(0))
    assert recorder.durable(ticket).done()
    assert seqs_on_disk(store.path) == [1]
    recorder.close()
