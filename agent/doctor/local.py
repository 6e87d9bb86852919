"""Checks of this machine: state directory, database, audit chain, disk, ICE, HTTP port.

Blocking work (SQLite, the file system, interface lookups) is done by the ``*_sync``
functions, which the runner calls in threads. The database is opened read-only, so doctor
never creates, migrates or locks the agent's state.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import shutil
import socket
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import ifaddr

from agent.access import audit
from agent.access.db import MIGRATIONS, db_path
from agent.config import Config, check_private
from agent.doctor.model import Result, Status, result
from agent.errors import ConfigError, SecretFileExposed
from agent.http import tls
from agent.rtsp.protocol import SERVER_NAME

GROUP = "agent"
DISK_WARN = 500 * 1024 * 1024
DISK_FAIL = 50 * 1024 * 1024
#: Interface name prefixes of container bridges and VPNs: their addresses are offered to
#: viewers who can rarely reach them (docs/troubleshooting.md: "The page never says live").
VIRTUAL_INTERFACES = ("docker", "br-", "veth", "virbr", "lxcbr", "tun", "tap", "wg", "zt",
                      "tailscale", "cni", "flannel")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def state_dir_sync(config: Config) -> Result:
    d = config.state_dir
    fix_owner = (f"create it for the agent's user: sudo install -d -m 700 -o <agent user> {d} "
                 "(or set state_dir to a directory that user can write)")
    if d.exists() and not d.is_dir():
        return result(GROUP, "state_dir", Status.FAIL, f"state_dir {d} is not a directory",
                      f"remove or rename that file, or set state_dir elsewhere; {fix_owner}")
    if not d.exists():
        parent = _nearest_existing(d.parent)
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return result(GROUP, "state_dir", Status.OK,
                          f"{d} does not exist yet; the agent creates it at first start")
        return result(GROUP, "state_dir", Status.FAIL,
                      f"{d} does not exist and {parent} is not writable by this user",
                      fix_owner)
    # os.access ignores read-only mounts and is always true for root: try a real write.
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-", delete=True) as f:
            f.write(b"x")
            f.flush()
    except OSError as exc:
        return result(GROUP, "state_dir", Status.FAIL,
                      f"{d} is not writable: {exc.strerror or exc}",
                      "the token database and audit log live there: " + fix_owner +
                      "; run doctor as the agent's user to check that user's rights")
    return result(GROUP, "state_dir", Status.OK, f"{d} is writable")


def _open_ro(path: Path, timeout: float) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                           check_same_thread=False)


_DB_FIX = ("stop the agent, move agent.db (with agent.db-wal and agent.db-shm) aside, and "
           "restore it from a backup (docs/operations.md); without a backup, start with a "
           "fresh state directory and create the tokens again")


def database_sync(config: Config, timeout: float) -> Result:
    path = db_path(config.state_dir)
    if not path.exists():
        return result(GROUP, "database", Status.SKIP,
                      f"no database yet at {path}; the agent creates it at first start")
    try:
        conn = _open_ro(path, timeout)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tokens = conn.execute("SELECT count(*) FROM tokens").fetchone()[0] if version else 0
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return result(GROUP, "database", Status.WARN,
                          f"{path} stayed busy for {timeout:g} s", "run doctor again")
        return result(GROUP, "database", Status.FAIL, f"{path} cannot be read: {exc}",
                      "run doctor as the agent's user; if that user cannot read it either, "
                      "fix the file's owner (chown <agent user> " + str(path) + ")")
    except sqlite3.DatabaseError as exc:
        return result(GROUP, "database", Status.FAIL, f"{path} is damaged: {exc}", _DB_FIX)
    if rows != ["ok"]:
        shown = "; ".join(str(r) for r in rows[:3])
        return result(GROUP, "database", Status.FAIL,
                      f"{path} failed the integrity check: {shown}", _DB_FIX)
    latest = len(MIGRATIONS)
    if version > latest:
        return result(GROUP, "database", Status.FAIL,
                      f"{path} has schema version {version}, newer than this agent ({latest})",
                      "a newer agent wrote it: upgrade the agent (or restore the backup made "
                      "before the upgrade)")
    if version < latest:
        return result(GROUP, "database", Status.OK,
                      f"{path} is intact (schema {version}; upgraded to {latest} at next start)")
    return result(GROUP, "database", Status.OK,
                  f"{path} is intact (schema {version}, {tokens} tokens)")


def audit_sync(config: Config, timeout: float) -> Result:
    path = db_path(config.state_dir)
    if not path.exists():
        return result(GROUP, "audit", Status.SKIP, "no database yet, so no audit log")
    try:
        conn = _open_ro(path, timeout)
        try:
            outcome = audit.verify(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return result(GROUP, "audit", Status.SKIP,
                      f"the audit log cannot be read ({exc}): see the database check")
    if outcome.ok:
        return result(GROUP, "audit", Status.OK,
                      f"hash chain intact: {outcome.checked} entries, head {outcome.head_seq} "
                      f"{outcome.head_hash[:16]}…")
    return result(GROUP, "audit", Status.FAIL,
                  f"the audit log was tampered with: {outcome.problem} "
                  f"({outcome.checked} entries verified before it)",
                  "someone changed agent.db outside the agent: keep a copy of the state "
                  "directory as evidence, export the log (therelay-agent audit --export jsonl), "
                  "find who had access to the file, and compare with a head hash kept earlier")


def disk_sync(config: Config) -> Result:
    where = _nearest_existing(config.state_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return result(GROUP, "disk", Status.SKIP, f"cannot measure free space at {where}: "
                      f"{exc.strerror or exc}")
    mb = free / 1024 / 1024
    why = ("SQLite refuses writes on a full disk: token changes fail and access decisions "
           "cannot be audited")
    fix = (f"free space on the file system holding {where} (old logs, journalctl "
           "--vacuum-size=100M, apt-get clean), or lower audit.retention_days")
    if free < DISK_FAIL:
        return result(GROUP, "disk", Status.FAIL, f"only {mb:.0f} MB free at {where}: {why}",
                      fix)
    if free < DISK_WARN:
        return result(GROUP, "disk", Status.WARN,
                      f"{mb:.0f} MB free at {where}; the audit log and its WAL grow here", fix)
    return result(GROUP, "disk", Status.OK, f"{mb / 1024:.1f} GB free at {where}")


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: list[str]


def interfaces() -> list[Interface]:
    """Every interface with the addresses aioice would take (IPv4, IPv6 without scope)."""
    out = []
    for adapter in ifaddr.get_adapters():
        found = []
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
            elif ip.ip[2] == 0:  # not link-local: aioice skips scoped addresses
                found.append(ip.ip[0])
        out.append(Interface(adapter.nice_name, found))
    return out


def judge_ice(configured: list[str] | None,
              nics: list[Interface]) -> tuple[Status, str, str | None]:
    """What WebRTC viewers will be offered, and whether that is likely to work."""
    mine = {a for n in nics for a in n.addresses}
    fix = ("set webrtc.host_addresses to the address viewers reach this machine at (e.g. "
           "[192.168.1.20]), or webrtc.interfaces to the LAN interface (e.g. [eth0])")
    if configured is not None:
        if not configured:
            return Status.FAIL, "webrtc.interfaces gives no address", fix
        foreign = [a for a in configured if a not in mine]
        if foreign:
            return (Status.FAIL, f"offered {', '.join(configured)}, but {', '.join(foreign)} "
                    "is not an address of this machine", fix)
        return Status.OK, f"offers {', '.join(configured)} (configured)", None
    # aioice's own rule (docs/field-notes.md): every address but 127.0.0.1 and ::1.
    offered = [(n.name, a) for n in nics for a in n.addresses if a not in ("127.0.0.1", "::1")]
    if not offered:
        return (Status.FAIL, "this machine has no address but loopback: WebRTC viewers get "
                "no candidate to connect to", "connect this machine to the LAN, then " + fix)
    virtual = sorted({name for name, _ in offered if name.startswith(VIRTUAL_INTERFACES)})
    listing = ", ".join(a for _, a in offered[:6]) + (" …" if len(offered) > 6 else "")
    if virtual:
        return (Status.WARN, f"offers every address ({listing}), including those of "
                f"{', '.join(virtual)}, which viewers usually cannot reach", fix)
    if len({a for _, a in offered if ipaddress.ip_address(a).version == 4}) > 1:
        return (Status.INFO, f"offers every address ({listing}); if a viewer never plays, "
                "pin the one it reaches", None)
    return Status.OK, f"offers {listing}", None


def ice_sync(config: Config) -> Result:
    from agent.webrtc.ice import host_addresses, rtc_configuration  # noqa: PLC0415 (slow)

    try:
        configured = host_addresses(config.webrtc)
        rtc_configuration(config.webrtc)  # TURN credential files must be readable
    except ConfigError as exc:
        return result(GROUP, "ice", Status.FAIL, str(exc),
                      exc.fix if isinstance(exc, SecretFileExposed)
                      else "fix webrtc.interfaces / webrtc.ice_servers in the config")
    status, finding, fix = judge_ice(configured, interfaces())
    return result(GROUP, "ice", status, finding, fix)


# -- the daemon and its HTTP port ---------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    """What /healthz on http.listen said (running), or why nothing answered."""

    running: bool
    health: dict[str, Any] | None = None
    problem: str | None = None


def _local_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 (a wildcard listen is reached on loopback)
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


async def probe_daemon(config: Config, timeout: float) -> Daemon:
    host, port = config.http.host_port
    local = _local_host(host)
    scheme = "https" if tls.enabled(config) else "http"
    url = f"{scheme}://{f'[{local}]' if ':' in local else local}:{port}/healthz"
    try:
        # Is it running? No secret is sent, so the certificate need not be checked here
        # (the "tls" check reads it from its file).
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.get(url, allow_redirects=False, ssl=False) as response:
            if response.status == 200:
                body = await response.json(content_type=None)
                if isinstance(body, dict) and body.get("status") in ("ok", "degraded"):
                    return Daemon(True, body)
            return Daemon(False, problem=f"{url} answered {response.status}, not the agent")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Daemon(False, problem=str(exc) or type(exc).__name__)


def tls_sync(config: Config) -> Result:
    """The LAN listener's certificate: its fingerprint (what viewers compare), names and
    end; a key others may read, a pair that does not match, an expired certificate fail."""
    t = config.http.tls
    if not tls.enabled(config):
        return result(GROUP, "tls", Status.INFO,
                      "off: viewers, links and tokens cross the LAN in plain HTTP (set "
                      "http.tls.self_signed: true, or cert_file and key_file)")
    if t.self_signed:
        cert_file, key_file = tls.self_signed_paths(config.state_dir)
        if not cert_file.exists():
            return result(GROUP, "tls", Status.INFO,
                          f"self-signed: the agent makes its certificate at first start, in "
                          f"{cert_file}")
    else:
        assert t.cert_file is not None and t.key_file is not None
        cert_file, key_file = t.cert_file, t.key_file
    try:
        cert = tls.describe(cert_file, key_file, self_signed=t.self_signed)
        check_private(key_file, "http.tls.key_file")
        tls.server_context(cert)  # the key is the certificate's
    except SecretFileExposed as exc:
        return result(GROUP, "tls", Status.FAIL, str(exc), exc.fix)
    except ConfigError as exc:
        return result(GROUP, "tls", Status.FAIL, str(exc),
                      "set http.tls.cert_file/key_file to a PEM certificate and its key")
    until = cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    finding = (f"HTTPS, certificate SHA-256 {cert.fingerprint} (valid until {until}; "
               f"names {', '.join(cert.names) or 'none'})")
    if cert.not_after <= datetime.now(UTC):
        return result(GROUP, "tls", Status.FAIL, f"expired: {finding}",
                      "renew the certificate (self-signed: delete it and restart the agent)")
    return result(GROUP, "tls", Status.OK, finding)


def port_free_sync(config: Config) -> tuple[bool, str]:
    """Whether the daemon could bind http.listen now (bound and released at once)."""
    return bind_free_sync(*config.http.host_port)


def bind_free_sync(host: str, port: int) -> tuple[bool, str]:
    """Whether a TCP listener could bind host:port now (bound and released at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False, "another program already listens on it"
            if exc.errno == errno.EADDRNOTAVAIL:
                return False, f"{host} is not an address of this machine"
            if exc.errno == errno.EACCES:
                return False, f"port {port} needs privileges this user does not have"
            return False, exc.strerror or str(exc)
    return True, "free"


async def rtsp_server_name(config: Config, timeout: float) -> str | None:
    """The Server header an RTSP OPTIONS on rtsp.listen is answered with ("" if none),
    or None when nothing answers."""
    host, port = config.rtsp.host_port
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_local_host(host), port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return ""
    finally:
        writer.close()
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "server":
            return value.strip()
    return ""


def judge_rtsp(config: Config, daemon: Daemon, server: str | None,
               free: tuple[bool, str] | None) -> Result:
    listen = config.rtsp.listen
    if not config.rtsp.enabled:
        return result(GROUP, "rtsp", Status.INFO, "RTSP is off (rtsp.enabled: false)")
    if daemon.running:
        if server == SERVER_NAME:
            return result(GROUP, "rtsp", Status.OK, f"the agent serves RTSP on {listen}")
        if server is None:
            return result(GROUP, "rtsp", Status.WARN,
                          f"the agent runs but nothing answers RTSP on {listen}",
                          "its log says why (rtsp_unavailable): another program may hold "
                          "the port; change rtsp.listen or stop that program")
        return result(GROUP, "rtsp", Status.WARN,
                      f"another RTSP server ({server or 'unnamed'}) answers on {listen}",
                      "stop it (ss -ltnp shows it) or set rtsp.listen to a free port")
    return _judge_free("rtsp", listen, free, "rtsp.listen to a free host:port (or "
                       "rtsp.enabled: false)")


def _judge_free(check: str, listen: str, free: tuple[bool, str] | None, setting: str) -> Result:
    """The agent is not running: can it bind ``listen``?"""
    assert free is not None
    ok, why = free
    if ok:
        return result(GROUP, check, Status.OK, f"the agent is not running; {listen} is free")
    return result(GROUP, check, Status.FAIL, f"the agent cannot listen on {listen}: {why}",
                  f"stop the other program (ss -ltnp shows it), or set {setting}")


def judge_http(config: Config, daemon: Daemon, free: tuple[bool, str] | None) -> Result:
    listen = config.http.listen
    if daemon.running and daemon.health is not None:
        h = daemon.health
        if h.get("agent_id") != config.agent.id:
            return result(GROUP, "http", Status.WARN,
                          f"an agent with id {h.get('agent_id')!r} answers on {listen}, not "
                          f"{config.agent.id!r}",
                          "another configuration is running there: check --config, or stop "
                          "the other agent")
        problems = h.get("problems")
        if isinstance(problems, list) and problems:
            return result(GROUP, "http", Status.FAIL,
                          f"the agent running on {listen} is degraded: "
                          f"{'; '.join(str(p) for p in problems)}",
                          "follow the message above; the agent's log says the same")
        return result(GROUP, "http", Status.INFO,
                      f"the agent is running on {listen} (version {h.get('version')}, up "
                      f"{h.get('uptime_s')} s, relay {h.get('relay')})")
    return _judge_free("http", listen, free,
                       "http.listen (or THERELAY_HTTP_LISTEN) to a free host:port")
