"""The relay outbox: which access events the relay has acknowledged (usage.v1, and the
token sync cursor it resumes from), kept in the state database's ``meta`` table so that a
restart resends exactly what was not acknowledged (docs/relay-protocol.md §1.5).

Blocking: call from threads, never from the event loop.
"""

from __future__ import annotations

import sqlite3

from agent.state.database import StateDB


class RelayOutbox:
    """Cursors of what went to the relay and came back from it."""

    def __init__(self, db: StateDB) -> None:
        self._db = db

    def relay_cursor(self) -> str | None:
        """The cursor of the last token sync applied (written with the sync itself)."""
        return self._db.meta("relay_cursor")

    def usage_sent_through(self) -> int:
        """The last audit seq whose access events the relay acknowledged (usage.v1)."""
        return int(self._db.meta("relay_usage_seq") or 0)

    def usage_outstanding(self) -> int | None:
        """The last audit seq of the usage batch sent and not yet acknowledged, if any: a
        resend (after a reconnect or a restart) covers exactly the same entries, so it has
        the same batch name and the relay counts it once."""
        value = self._db.meta("relay_usage_pending")
        return int(value) if value else None

    def mark_usage_outstanding(self, seq: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                         "VALUES ('relay_usage_pending', ?)", (str(seq),))

        self._db.write(work)

    def mark_usage_sent(self, seq: int) -> None:
        """The relay acknowledged everything through ``seq``; nothing is outstanding."""
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                         "VALUES ('relay_usage_seq', ?)", (str(seq),))
            conn.execute("DELETE FROM meta WHERE key = 'relay_usage_pending'")

        self._db.write(work)
