"""Checks of the bounds a hostile LAN pushes against: audit size and open files."""

from __future__ import annotations

import re
import resource
from pathlib import Path

from agent.access.recorder import RESERVE_NAME, database_bytes
from agent.config import Config
from agent.doctor.model import Result, Status, result
from agent.state.db import db_path

GROUP = "agent"
#: doctor warns from this share of audit.max_size_mb on.
QUOTA_WARN = 0.8
#: Where the packages install the unit (the first one found is read).
UNIT_FILES = (Path("/etc/systemd/system/therelay-agent.service"),
              Path("/lib/systemd/system/therelay-agent.service"),
              Path("/usr/lib/systemd/system/therelay-agent.service"))
#: Descriptors one WebRTC session takes at most (UDP sockets per candidate, DTLS, the
#: HTTP request that made it), measured with aiortc on a host with two addresses.
FDS_PER_SESSION = 6
FDS_BASE = 256  # cameras, the database, the relay link, discovery sockets, libraries


def audit_size_sync(config: Config) -> Result:
    path = db_path(config.state_dir)
    if not path.exists():
        return result(GROUP, "audit_size", Status.SKIP, "no database yet")
    size = database_bytes(path)
    quota = config.audit.max_size_mb * 1024 * 1024
    share = size / quota
    finding = (f"the state database takes {size / 2**20:.1f} MB of audit.max_size_mb "
               f"{config.audit.max_size_mb} ({share:.0%})")
    if not (config.state_dir / RESERVE_NAME).exists():
        finding += "; no audit reserve file yet (the running agent keeps one when it has room)"
    fix = ("lower audit.retention_days (older entries are pruned every hour) or raise "
           "audit.max_size_mb, after checking `therelay-agent audit --result denied` for a "
           "client hammering the agent")
    if share >= 1:
        return result(GROUP, "audit_size", Status.FAIL,
                      finding + ": denials are only counted now, not written one by one", fix)
    if share >= QUOTA_WARN:
        return result(GROUP, "audit_size", Status.WARN,
                      finding + ": past 100 % denials will only be counted", fix)
    return result(GROUP, "audit_size", Status.OK, finding)


def unit_limit(text: str) -> int | None:
    """``LimitNOFILE=`` of a unit file (soft:hard → the hard value; infinity → a big one)."""
    found = re.findall(r"(?m)^\s*LimitNOFILE\s*=\s*(\S+)", text)
    if not found:
        return None
    value = found[-1].split(":")[-1]
    return 1 << 30 if value == "infinity" else int(value) if value.isdigit() else None


def needed_files(config: Config) -> int:
    return (config.http.max_connections + config.sessions.max_total * FDS_PER_SESSION
            + FDS_BASE)


def open_files_sync(config: Config) -> Result:
    """The agent raises its soft limit to the hard one at start: is that enough for the
    configured connection and session caps?"""
    need = needed_files(config)
    unit = next((p for p in UNIT_FILES if p.exists()), None)
    limit: int | None
    if unit is not None:
        limit = unit_limit(unit.read_text(encoding="utf-8", errors="replace"))
        where = f"{unit} (LimitNOFILE)"
        if limit is None:
            limit, where = 1024, f"{unit} (no LimitNOFILE: systemd's default 1024)"
    else:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        where = "this shell (ulimit -Hn)"
    fix = ("set LimitNOFILE=65536 in the unit (systemctl edit therelay-agent), or lower "
           "http.max_connections and sessions.max_total")
    finding = f"open files allowed: {limit} by {where}; the configured caps need about {need}"
    if limit < need:
        return result(GROUP, "open_files", Status.WARN,
                      finding + ": past it new viewers and requests fail", fix)
    return result(GROUP, "open_files", Status.OK, finding)

