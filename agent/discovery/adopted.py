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
from agent.config import CameraConfig, RtspAuth, Transport
from agent.discovery.trust import Identity
from agent.errors import NotFoundError, UsageError

CREDENTIALS_DIR = "camera-credentials"
METHODS = ("onvif", "mdns")
#: Sightings kept in the database (the `discover` cache); the oldest go first.
MAX_SIGHTINGS = 1024
#: Distinct addresses a camera's held move remembers (and audits) until the installer acts.
MAX_HELD_ADDRESSES = 8


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
    # What the device said about itself over ONVIF at adoption: a move must show it again.
    serial: str | None = None
    hardware_id: str | None = None
    home_network: str | None = None  # the network it was adopted in (CIDR)
    rtsp_auth: str | None = None  # digest | basic | none: how its RTSP server asked
    allow_basic: bool = False  # the installer allows RTSP Basic even after a move
    moved: bool = False  # it has moved since adoption: its password goes by Digest only
    pending: dict[str, Any] | None = None  # a move waiting for the installer (see trust.py)

    @property
    def identity_record(self) -> Identity:
        return Identity(self.serial, self.hardware_id)


_COLUMNS = ("id", "identity", "method", "name", "source", "username", "profile", "xaddr",
            "transport", "adopted_at", "updated_at", "serial", "hardware_id", "home_network",
            "rtsp_auth", "allow_basic", "moved", "pending")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM adopted_cameras"


def _row(row: tuple[Any, ...]) -> AdoptedCamera:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["allow_basic"], data["moved"] = bool(data["allow_basic"]), bool(data["moved"])
    data["pending"] = json.loads(data["pending"]) if data["pending"] else None
    return AdoptedCamera(**data)


def _values(camera: AdoptedCamera) -> tuple[Any, ...]:
    data = asdict(camera)
    data["pending"] = json.dumps(camera.pending, sort_keys=True) if camera.pending else None
    data["allow_basic"], data["moved"] = int(camera.allow_basic), int(camera.moved)
    return tuple(data[c] for c in _COLUMNS)


def rtsp_auth_rule(camera: AdoptedCamera) -> RtspAuth:
    """``cameras[].rtsp_auth`` for an adopted camera: Digest only once it moved or asked for
    Digest, unless the installer allowed Basic (``cameras allow-basic``)."""
    if camera.allow_basic:
        return "basic"
    return "digest" if camera.moved or camera.rtsp_auth == "digest" else "auto"


def held_move_text(camera_id: str, pending: dict[str, Any]) -> str:
    """One line for the installer about a move discovery did not make on its own."""
    return (f"camera {camera_id!r} was announced at {pending.get('to')} (it is at "
            f"{pending.get('from')}); not followed: {pending.get('reason')}. If it really "
            f"moved: therelay-agent cameras move {camera_id} {pending.get('to')}")


def camera_config(camera: AdoptedCamera, credentials: Path) -> CameraConfig:
    """The camera as the hub builds it (the password is read from its file at connect time)."""
    password = credentials / camera.id
    return CameraConfig(
        id=camera.id, source=camera.source, name=camera.name, transport=camera.transport,
        username=camera.username,
        password_file=password if camera.username and password.exists() else None,
        rtsp_auth=rtsp_auth_rule(camera),
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
                         f"({', '.join('?' * len(_COLUMNS))})", _values(camera))
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
              now: float | None = None, detail: dict[str, Any] | None = None,
              actor: str = "discovery", home_network: str | None = None) -> None:
        """The camera answers at another address: its stream URL follows (audited). From now
        on its RTSP password goes by Digest only (unless Basic is allowed for it)."""
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE adopted_cameras SET source = ?, xaddr = ?, updated_at = ?, "
                         "moved = 1, pending = NULL, home_network = coalesce(?, home_network)"
                         " WHERE id = ?", (source, xaddr, now, home_network, camera_id))
            audit.append(conn, [audit.AuditEntry(now, "camera.moved", camera=camera_id,
                                                 actor=actor, detail=detail or {})])

        self._store.write(work)

    def hold_move(self, camera_id: str, pending: dict[str, Any], *,
                  now: float | None = None) -> bool:
        """Keep a move that did not prove itself for the installer to confirm. Audited once
        per address, for up to ``MAX_HELD_ADDRESSES`` addresses until the installer acts: a
        flood of forged announcements adds no rows. True if this address is new."""
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT pending FROM adopted_cameras WHERE id = ?",
                               (camera_id,)).fetchone()
            if row is None:
                return False
            old = json.loads(row[0]) if row[0] else {}
            seen: list[str] = list(old.get("addresses", []))
            if pending.get("to") in seen or len(seen) >= MAX_HELD_ADDRESSES:
                return False
            seen.append(str(pending.get("to")))
            text = json.dumps({**pending, "at": now, "addresses": seen}, sort_keys=True)
            conn.execute("UPDATE adopted_cameras SET pending = ?, updated_at = ? WHERE id = ?",
                         (text, now, camera_id))
            detail: dict[str, Any] = {k: pending[k] for k in ("from", "to", "reason")
                                      if k in pending}
            audit.append(conn, [audit.AuditEntry(now, "camera.move_held", camera=camera_id,
                                                 actor="discovery", detail=detail)])
            return True

        return bool(self._store.write(work))

    def clear_held(self, camera_id: str, *, actor: str, now: float | None = None) -> None:
        """The installer says the camera did not move: forget the held move (audited)."""
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE adopted_cameras SET pending = NULL, updated_at = ? WHERE id = ?",
                         (now, camera_id))
            audit.append(conn, [audit.AuditEntry(now, "camera.move_dismissed",
                                                 camera=camera_id, actor=actor)])

        self._store.write(work)

    def record_identity(self, camera_id: str, identity: Identity, home_network: str | None,
                        *, now: float | None = None) -> None:
        """Record what proves the camera's identity (cameras adopted before it was kept)."""
        now = time.time() if now is None else now
        self._store.write(lambda conn: conn.execute(
            "UPDATE adopted_cameras SET serial = ?, hardware_id = ?, "
            "home_network = coalesce(home_network, ?), updated_at = ? WHERE id = ?",
            (identity.serial, identity.hardware_id, home_network, now, camera_id)))

    def set_allow_basic(self, camera_id: str, allow: bool, *, actor: str,
                        now: float | None = None) -> None:
        now = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("UPDATE adopted_cameras SET allow_basic = ?, updated_at = ? "
                            "WHERE id = ?", (int(allow), now, camera_id)).rowcount == 0:
                raise NotFoundError(f"no adopted camera {camera_id!r} (see: therelay-agent "
                                    "cameras list)")
            audit.append(conn, [audit.AuditEntry(now, "camera.rtsp_basic", camera=camera_id,
                                                 actor=actor, detail={"allowed": allow})])

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


def read_adopted_cameras(state_dir: Path) -> list[AdoptedCamera]:
    """The adopted cameras, read without writing (for ``doctor``, which must not migrate or
    lock the database of a running daemon). Empty when there is none."""
    path = db_path(state_dir)
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute(f"{_SELECT} ORDER BY adopted_at, id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # older schema, damaged: doctor's database check says
        return []
    return [_row(r) for r in rows]

