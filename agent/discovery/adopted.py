"""Cameras adopted from discovery: rows in the state database, passwords in files of their own.

The YAML names the cameras an installer typed; adoption adds cameras without touching it.
Both end up as ``CameraConfig`` entries in the running camera set (config cameras win on an
id clash). A camera's *identity* — the ONVIF endpoint UUID or the mDNS instance name — is
what discovery follows when the camera's address changes; its *id* is the name tokens and
URLs use, and never changes.

Passwords are not in the database (whose other columns are listed and exported freely): each
is a file ``state_dir/camera-credentials/<id>``, mode 0600 in a 0700 directory, owned by the
state directory's owner, so an adoption made with ``sudo`` stays readable by the agent's
user. Nothing here prints or logs a password.

Blocking (SQLite and files): call from threads or the CLI, never from the event loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.access import audit
from agent.access.db import db_path
from agent.access.model import is_identifier
from agent.access.store import TokenStore
from agent.config import CameraConfig, Transport
from agent.errors import NotFoundError, UsageError

CREDENTIALS_DIR = "camera-credentials"
METHODS = ("onvif", "mdns")
#: Sightings kept in the database (the `discover` cache); the oldest go first.
MAX_SIGHTINGS = 1024


@dataclass(frozen=True)
class AdoptedCamera:
    id: str
    identity: str
    method: str
    source: str  # the stream URL, never with a password in it
    name: str = ""
    username: str | None = None
    profile: str = "main"
    xaddr: str | None = None  # ONVIF device service URL, to ask again after a move
    transport: Transport = "tcp"
    adopted_at: float = 0.0
    updated_at: float = 0.0


_COLUMNS = ("id", "identity", "method", "name", "source", "username", "profile", "xaddr",
            "transport", "adopted_at", "updated_at")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM adopted_cameras"


def _row(row: tuple[Any, ...]) -> AdoptedCamera:
    return AdoptedCamera(**dict(zip(_COLUMNS, row, strict=True)))


def camera_config(camera: AdoptedCamera, credentials: Path) -> CameraConfig:
    """The camera as the hub builds it (the password is read from its file at connect time)."""
    password = credentials / camera.id
    return CameraConfig(
        id=camera.id, source=camera.source, name=camera.name, transport=camera.transport,
        username=camera.username,
        password_file=password if camera.username and password.exists() else None,
    )


class AdoptedCameras:
    """The adopted-camera table of a token store's database, and the credential files."""

    def __init__(self, store: TokenStore, state_dir: Path) -> None:
        self._store = store
        self._state_dir = state_dir
        self.credentials = state_dir / CREDENTIALS_DIR

    # -- reads ----------------------------------------------------------------------------

    def all(self) -> list[AdoptedCamera]:
        rows = self._store.read(
            lambda c: c.execute(f"{_SELECT} ORDER BY adopted_at, id").fetchall())
        return [_row(r) for r in rows]

    def get(self, camera_id: str) -> AdoptedCamera:
        row = self._store.read(
            lambda c: c.execute(f"{_SELECT} WHERE id = ?", (camera_id,)).fetchone())
        if row is None:
            raise NotFoundError(f"no adopted camera {camera_id!r} (see: therelay-agent "
                                "cameras list)")
        return _row(row)

    def by_identity(self, identity: str) -> AdoptedCamera | None:
        row = self._store.read(
            lambda c: c.execute(f"{_SELECT} WHERE identity = ?", (identity,)).fetchone())
        return _row(row) if row else None

    def signature(self) -> tuple[Any, ...]:
        """Changes whenever an adoption, removal or move is committed (by any process)."""
        return tuple(self._store.read(lambda c: c.execute(
            "SELECT count(*), max(updated_at), group_concat(id) FROM adopted_cameras"
        ).fetchone()))

    def password_file(self, camera_id: str) -> Path:
        return self.credentials / camera_id

    def config(self, camera: AdoptedCamera) -> CameraConfig:
        return camera_config(camera, self.credentials)

    # -- writes ---------------------------------------------------------------------------

    def add(self, camera: AdoptedCamera, password: str | None, *, taken: Iterable[str],
            actor: str, now: float | None = None) -> AdoptedCamera:
        """Adopt ``camera``; ``taken`` are ids already used by the config file's cameras."""
        now = time.time() if now is None else now
        if not is_identifier(camera.id):
            raise UsageError(f"camera id {camera.id!r} must be 1-64 letters, digits, '.', '_' "
                             "or '-' (choose one with --id)")
        if camera.id in set(taken):
            raise UsageError(f"camera id {camera.id!r} is already used in the config file: "
                             "choose another with --id")
        if camera.method not in METHODS:
            raise ValueError(f"unknown discovery method {camera.method!r}")
        camera = AdoptedCamera(**{**asdict(camera), "adopted_at": now, "updated_at": now})

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM adopted_cameras WHERE id = ?",
                            (camera.id,)).fetchone():
                raise UsageError(f"camera id {camera.id!r} is already adopted: choose another "
                                 "with --id, or remove it first")
            same = conn.execute("SELECT id FROM adopted_cameras WHERE identity = ?",
                                (camera.identity,)).fetchone()
            if same:
                raise UsageError(f"this camera is already adopted as {same[0]!r}")
            conn.execute(f"INSERT INTO adopted_cameras ({', '.join(_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(_COLUMNS))})",
                         tuple(getattr(camera, c) for c in _COLUMNS))
            audit.append(conn, [audit.AuditEntry(
                now, "camera.adopted", camera=camera.id, actor=actor,
                detail={"method": camera.method, "identity": camera.identity,
                        "profile": camera.profile})])
            # The password file is written inside the transaction: if it fails, no row.
            self._write_password(camera.id, password)

        self._store.write(work)
        return camera

    def remove(self, camera_id: str, *, actor: str, now: float | None = None) -> None:
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM adopted_cameras WHERE id = ?",
                            (camera_id,)).rowcount == 0:
                raise NotFoundError(f"no adopted camera {camera_id!r} (cameras from the "
                                    "config file are removed by editing it)")
            audit.append(conn, [audit.AuditEntry(now, "camera.removed", camera=camera_id,
                                                 actor=actor)])

        self._store.write(work)
        self.password_file(camera_id).unlink(missing_ok=True)

    def moved(self, camera_id: str, source: str, xaddr: str | None, *,
              now: float | None = None, detail: dict[str, Any] | None = None) -> None:
        """The camera answers at another address: its stream URL follows (audited)."""
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE adopted_cameras SET source = ?, xaddr = ?, updated_at = ? "
                         "WHERE id = ?", (source, xaddr, now, camera_id))
            audit.append(conn, [audit.AuditEntry(now, "camera.moved", camera=camera_id,
                                                 actor="discovery", detail=detail or {})])

        self._store.write(work)

    def _write_password(self, camera_id: str, password: str | None) -> None:
        path = self.password_file(camera_id)
        if password is None:
            path.unlink(missing_ok=True)
            return
        self.credentials.mkdir(mode=0o700, exist_ok=True)
        owner = os.stat(self._state_dir)
        tmp = path.with_name(f".{camera_id}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, password.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.geteuid() == 0:  # `sudo therelay-agent cameras adopt`: the agent's user reads it
            for p in (self.credentials, tmp):
                os.chown(p, owner.st_uid, owner.st_gid)
        os.replace(tmp, path)

    # -- sightings (the cache `discover` fills and `cameras adopt` reads) -------------------

    def remember(self, sightings: Iterable[tuple[str, dict[str, Any]]],
                 now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = [(identity, json.dumps(data, sort_keys=True), now) for identity, data in sightings]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO sightings (identity, data, last_seen) VALUES (?, ?, ?)"
                             " ON CONFLICT (identity) DO UPDATE SET data = excluded.data, "
                             "last_seen = excluded.last_seen", rows)
            conn.execute("DELETE FROM sightings WHERE identity NOT IN (SELECT identity FROM "
                         "sightings ORDER BY last_seen DESC LIMIT ?)", (MAX_SIGHTINGS,))

        if rows:
            self._store.write(work)

    def sightings(self) -> list[tuple[dict[str, Any], float]]:
        rows = self._store.read(lambda c: c.execute(
            "SELECT data, last_seen FROM sightings ORDER BY last_seen DESC").fetchall())
        return [(json.loads(data), last_seen) for data, last_seen in rows]


def read_adopted(state_dir: Path) -> list[CameraConfig]:
    """The adopted cameras as camera configs, read without writing (for ``doctor``, which
    must not migrate or lock the database of a running daemon). Empty when there is none."""
    path = db_path(state_dir)
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute(f"{_SELECT} ORDER BY adopted_at, id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # no table yet (older schema), damaged: doctor's database check says
        return []
    return [camera_config(_row(r), state_dir / CREDENTIALS_DIR) for r in rows]
