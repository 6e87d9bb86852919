"""The state database: one SQLite file in ``state_dir`` (WAL), versioned by migrations.

Blocking: call from threads (or the CLI), never from the event loop.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from agent.errors import StoreError

DB_NAME = "agent.db"

# Each entry upgrades the schema by one version (PRAGMA user_version). Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('rev', '0');
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        secret_hash BLOB NOT NULL UNIQUE,
        last4 TEXT NOT NULL,
        protocols TEXT NOT NULL DEFAULT '',
        permission TEXT,
        created_at REAL NOT NULL,
        expires_at REAL,
        label TEXT NOT NULL DEFAULT '',
        created_by TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL DEFAULT 'local',
        ttl REAL,
        revoked_at REAL,
        replaced_by TEXT,
        replaces TEXT,
        last_used_at REAL,
        rev INTEGER NOT NULL
    );
    CREATE INDEX tokens_rev ON tokens (rev);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        event TEXT NOT NULL,
        token_id TEXT,
        camera TEXT,
        protocol TEXT,
        peer_ip TEXT,
        actor TEXT,
        result TEXT,
        reason TEXT,
        detail TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_token ON audit (token_id, seq);
    CREATE INDEX audit_ts ON audit (ts);
    CREATE TABLE usage_hourly (
        token_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        granted INTEGER NOT NULL DEFAULT 0,
        denied INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (token_id, hour, protocol)
    ) WITHOUT ROWID;
    CREATE TABLE usage_ips (
        token_id TEXT NOT NULL,
        ip TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (token_id, ip)
    ) WITHOUT ROWID;
    """,
    # 2: cameras adopted from discovery (agent/discovery/adopted.py) and the last sightings
    """
    CREATE TABLE adopted_cameras (
        id TEXT PRIMARY KEY,
        identity TEXT NOT NULL UNIQUE,
        method TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        username TEXT,
        profile TEXT NOT NULL DEFAULT 'main',
        xaddr TEXT,
        transport TEXT NOT NULL DEFAULT 'tcp',
        adopted_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE sightings (
        identity TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        last_seen REAL NOT NULL
    );
    """,
    # 3: per-token session caps (and the daemon's live count per token, for the CLI's
    # 'token check'), and two promises kept by the database itself, whatever
    # code path writes (docs/tokens.md): a revocation is never undone nor postponed, and a
    # token id keeps the hash it was born with.
    """
    ALTER TABLE tokens ADD COLUMN max_sessions INTEGER;
    CREATE TRIGGER tokens_revocation_final BEFORE UPDATE OF revoked_at ON tokens
    WHEN OLD.revoked_at IS NOT NULL
         AND (NEW.revoked_at IS NULL OR NEW.revoked_at > OLD.revoked_at)
    BEGIN SELECT RAISE(ABORT, 'revocation is final'); END;
    CREATE TRIGGER tokens_hash_fixed BEFORE UPDATE OF secret_hash ON tokens
    WHEN NEW.secret_hash IS NOT OLD.secret_hash
    BEGIN SELECT RAISE(ABORT, 'a token id keeps its hash'); END;
    CREATE TABLE live_sessions (
        token_id TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: what proves an adopted camera is the same device after a move (discovery/trust.py),
    # how it asked for its RTSP password, and a move waiting for the installer's word
    """
    ALTER TABLE adopted_cameras ADD COLUMN serial TEXT;
    ALTER TABLE adopted_cameras ADD COLUMN hardware_id TEXT;
    ALTER TABLE adopted_cameras ADD COLUMN home_network TEXT;
    ALTER TABLE adopted_cameras ADD COLUMN rtsp_auth TEXT;
    ALTER TABLE adopted_cameras ADD COLUMN allow_basic INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE adopted_cameras ADD COLUMN moved INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE adopted_cameras ADD COLUMN pending TEXT;
    """,
)


def db_path(state_dir: Path) -> Path:
    return state_dir / DB_NAME


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the database; raise StoreError with a fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not path.exists()
        conn = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        if new:
            os.chmod(path, 0o600)  # token hashes and the audit trail are the agent's alone
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn)
    except sqlite3.Error as exc:
        raise StoreError(explain(exc, path)) from None
    except OSError as exc:
        raise StoreError(
            f"cannot create the state directory {path.parent}: {exc.strerror}. "
            "Set state_dir to a directory the agent's user can write."
        ) from None
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the state database has schema version {version}, newer than this agent "
                f"understands ({len(MIGRATIONS)}): upgrade the agent."
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def _statements(script: str) -> Iterator[str]:
    """Split a script at the ``;`` that end statements (a trigger body holds more)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def explain(exc: sqlite3.Error, path: Path | str | None = None) -> str:
    """One line for the installer about a failed database operation (never a traceback)."""
    where = f"the state database {path}" if path else "the state database"
    folder = Path(path).parent if path else "state_dir"
    text = str(exc).lower()
    if "full" in text or ("disk i/o" in text and _nearly_full(folder)):
        # SQLite often reports a full disk as an I/O error (writing its WAL or shared
        # memory file): the free space tells which it is.
        return (f"the disk holding {where} is full: free space there (df -h {folder}); nothing "
                "was changed")
    if "readonly" in text or "read-only" in text or _read_only(path):
        return (f"{where} is read-only: the agent's user must be able to write the file and "
                f"its directory {folder} (owner and mode), on a filesystem mounted read-write")
    if "unable to open" in text:
        return (f"cannot open {where}: check that {folder} exists and that the agent's user "
                "can write it")
    if "disk i/o" in text:
        return (f"disk I/O error on {where}: the disk may be failing, full, or gone (see "
                "`dmesg`)")
    if "locked" in text or "busy" in text:
        return (f"{where} is busy: another agent command or the daemon held it for 10 s; "
                "try again")
    if "malformed" in text or "not a database" in text:
        return (f"{where} is damaged ({exc}): restore it from a backup, or move it away to "
                "start with an empty one (every token is then gone)")
    return f"{where} failed: {exc}"


def _read_only(path: Path | str | None) -> bool:
    """The database file or its directory cannot be written (mode, owner, or a read-only
    mount), which SQLite may report only as "unable to open database file"."""
    if path is None:
        return False
    folder = Path(path).parent
    if not folder.is_dir():
        return False
    if not os.access(folder, os.W_OK):
        return True
    return Path(path).exists() and not os.access(path, os.W_OK)


def _nearly_full(folder: Path | str) -> bool:
    """Less than 64 KiB left for the agent's user (a page, a WAL frame, a journal)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 65536


def _path_of(conn: sqlite3.Connection) -> str | None:
    try:
        row = conn.execute("PRAGMA database_list").fetchone()
    except sqlite3.Error:
        return None
    return str(row[2]) if row and row[2] else None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: writers queue up instead of racing (limits, chain).

    A failed write becomes a :class:`StoreError` saying why (disk full, read-only…). SQLite
    rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR): the ROLLBACK is then
    skipped, so "cannot rollback - no transaction is active" never hides the real reason.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")  # waits up to the connection's 10 s busy timeout
    except sqlite3.Error as exc:
        raise StoreError(explain(exc, _path_of(conn))) from None
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with suppress(sqlite3.Error):  # the original failure is the one to tell
                conn.execute("ROLLBACK")
        # A constraint (a trigger's "revocation is final", a unique hash) is the caller's
        # mistake, not the disk's: it stays an IntegrityError.
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            raise StoreError(explain(exc, _path_of(conn))) from None
        raise


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the database file, or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def file_problem(path: Path, opened: tuple[int, int] | None) -> str | None:
    """Why the file at ``path`` is no longer the database the daemon opened, or None.

    The daemon's connection keeps the file it opened; if that file was removed (or replaced
    by a restore), its writes go to a file no one will see again, and tokens created by the
    CLI land in the other one."""
    now = file_identity(path)
    if now == opened:
        return None
    if now is None:
        return (f"the state database {path} was removed while the agent runs: its writes go "
                "to a deleted file and are lost at the next restart. Restore the file, then "
                "restart the agent")
    return (f"the state database {path} was replaced while the agent runs (another file is "
            "there now): the agent still uses the old one, the CLI the new one. Restart the "
            "agent to use the new file")


def next_rev(conn: sqlite3.Connection) -> int:
    """Bump the change counter the token watcher follows; call inside a transaction."""
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'rev'")
    return int(conn.execute("SELECT value FROM meta WHERE key = 'rev'").fetchone()[0])
