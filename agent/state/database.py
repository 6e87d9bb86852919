"""One open state database, shared by the modules that keep their tables in it.

The daemon and each CLI command open the file once (``StateDB``) and hand it to the token
store, the adopted cameras and the relay outbox, which take turns on the one connection
under its lock: SQLite allows one writer at a time anyway, and a single connection sees its
own commits at once.

Blocking: call from threads (or the CLI), never from the event loop.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.state.db import connect, file_identity, transaction

T = TypeVar("T")


class StateDB:
    """The connection (opened and migrated by :func:`agent.state.db.connect`) and its lock."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        #: (device, inode) of the file just opened: the daemon compares the path with it to
        #: notice the file removed or replaced under it. Taken here, not when that check first
        #: runs: a file removed in between would look like the one opened.
        self.identity = file_identity(path)
        #: Held for every statement: one thread at a time uses the connection.
        self.lock = threading.Lock()
        self.path = path

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection (queries)."""
        with self.lock:
            return fn(self.conn)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction."""
        with self.lock, transaction(self.conn):
            return fn(self.conn)

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table (cursors and counters kept with the data)."""
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None
