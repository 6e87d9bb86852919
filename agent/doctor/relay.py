"""Check the relay with the real protocol: the upgrade, then hello → welcome.

The relay closes the *older* connection of an agent id when a newer one says ``hello``
(docs/relay-protocol.md §4, close 4008). So when the daemon runs, doctor stops after the
upgrade (which already checks the publisher token, §1.1) and reads the relay's clock from
the upgrade's ``Date`` header; only when the daemon is not running does it say ``hello``,
to learn the agent binding, the permission and the relay's ``server_time`` from ``welcome``.
Messages come from ``agent.relay.protocol``; rejections are read as the link reads them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from email.utils import parsedate_to_datetime
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent import __version__
from agent.access.db import db_path
from agent.config import Config, publisher_token
from agent.doctor.model import Result, Status, result
from agent.errors import ConfigError, SecretFileExposed
from agent.relay import protocol
from agent.relay.link import ADVICE, CLOCK_SKEW_WARN, Rejected, rejection_of
from agent.relay.protocol import CLOSE_REASONS, TOKEN_REJECTIONS, ProtocolError, Welcome

GROUP = "relay"
SKEW_FIX = ("token expiry depends on this machine's clock: enable NTP (timedatectl set-ntp "
            "true) and check that UDP port 123 may leave the network")


def cursor_sync(config: Config) -> str | None:
    """The token cursor the daemon last applied (so the relay sends a small sync), if any."""
    try:
        conn = sqlite3.connect(f"file:{db_path(config.state_dir)}?mode=ro", uri=True,
                               timeout=1)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'relay_cursor'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _inventory(config: Config) -> list[dict[str, Any]]:
    """hello's cameras (§1.3) as a stopped agent has them: idle, no source, no credentials."""
    return [{"id": c.id, "name": c.name, "state": "idle", "error": None, "video": None,
             "audio": None} for c in config.cameras]


def judge_skew(skew: float, how: str) -> Result:
    ahead = "ahead of" if skew > 0 else "behind"
    if abs(skew) > CLOCK_SKEW_WARN:
        return result(GROUP, "clock", Status.WARN,
                      f"this machine's clock is {abs(skew):.0f} s {ahead} the relay's ({how})",
                      SKEW_FIX)
    return result(GROUP, "clock", Status.OK, f"within {max(abs(skew), 0.001):.3g} s of the "
                  f"relay's clock ({how})")


def _rejected(reason: str, message: str = "") -> list[Result]:
    fix = ADVICE.get(reason, "see docs/relay-protocol.md, section 1.6")
    return [result(GROUP, "token", Status.FAIL,
                   f"the relay refused the publisher token: {reason}"
                   + (f" ({message})" if message and message != reason else ""), fix),
            result(GROUP, "clock", Status.SKIP, "no session with the relay")]


async def check_relay(config: Config, timeout: float, daemon_running: bool,
                      daemon_relay: str | None = None) -> list[Result]:
    url = config.relay.url
    if url is None:
        return [result(GROUP, "relay", Status.SKIP,
                       "no relay.url: LAN viewing only, nothing published to TheRelay")]
    try:
        token = await asyncio.to_thread(publisher_token, config)
    except ConfigError as exc:
        return [result(GROUP, "token", Status.FAIL, str(exc),
                       exc.fix if isinstance(exc, SecretFileExposed) else
                       "put the trp_ publisher token from TheRelay Dashboard (Settings > "
                       "Tokens) in relay.publisher_token_file, readable by the agent's user")]
    assert token is not None  # publisher_token raises when relay.url is set without one
    cursor = None if daemon_running else await asyncio.to_thread(cursor_sync, config)
    try:
        ws = await asyncio.wait_for(connect(
            url, subprotocols=[protocol.SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token}"},
            user_agent_header=f"therelay-agent/{__version__} doctor", proxy=None,
            max_size=protocol.MAX_MESSAGE, open_timeout=timeout, close_timeout=1), timeout)
    except InvalidStatus as exc:
        rejection = rejection_of(exc)
        if isinstance(rejection, Rejected):
            return _rejected(rejection.reason, str(rejection))
        return _unreachable(url, str(rejection))
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return _unreachable(url, _describe(exc, timeout))
    try:
        if daemon_running:
            return _upgrade_only(ws, daemon_relay)
        return await _session(ws, config, cursor, timeout)
    finally:
        await ws.close()


def _upgrade_only(ws: ClientConnection, daemon_relay: str | None) -> list[Result]:
    state = f"; the running agent's link is {daemon_relay}" if daemon_relay else ""
    if daemon_relay == "rejected":
        token = result(GROUP, "token", Status.WARN,
                       "the relay accepts the publisher token at the upgrade, but the running "
                       "agent's link is rejected", "look for relay_rejected_agent in the "
                       "agent's log: its fix names the reason (often agent.id)")
    else:
        token = result(GROUP, "token", Status.OK, "the relay accepts the publisher token (not "
                       "saying hello: the agent is running, it would be replaced)" + state)
    date = ws.response.headers.get("Date") if ws.response is not None else None
    if date is None:
        return [token, result(GROUP, "clock", Status.SKIP, "the relay sent no Date header")]
    try:
        relay_time = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return [token, result(GROUP, "clock", Status.SKIP, "the relay's Date is unreadable")]
    # Date has a resolution of one second: round so as not to report a half-second as skew.
    return [token, judge_skew(round(time.time() - relay_time), "its Date header")]


async def _session(ws: ClientConnection, config: Config, cursor: str | None,
                   timeout: float) -> list[Result]:
    hello = protocol.hello(config.agent.id, __version__, cursor, _inventory(config))
    try:
        await ws.send(json.dumps(hello, separators=(",", ":")))
        first = protocol.parse(await asyncio.wait_for(ws.recv(), timeout))
        now = time.time()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else 1006
        reason = CLOSE_REASONS.get(code)
        if reason in TOKEN_REJECTIONS:
            return _rejected(reason)
        if reason == "replaced":
            return [result(GROUP, "token", Status.FAIL,
                           f"the relay refused a second connection for agent id "
                           f"{config.agent.id!r} (4008): another agent uses this id",
                           "give each agent its own agent.id (and its own publisher token)"),
                    result(GROUP, "clock", Status.SKIP, "no session with the relay")]
        return _unreachable(config.relay.url or "", f"the relay closed the connection ({code})")
    except TimeoutError:
        return _unreachable(config.relay.url or "", f"no welcome within {timeout:g} s")
    except ProtocolError as exc:
        return _unreachable(config.relay.url or "", f"the relay broke the protocol: {exc}")
    if not isinstance(first, Welcome):
        return _unreachable(config.relay.url or "", "the relay did not answer hello with welcome")
    if first.agent_id != config.agent.id:
        return _rejected("agent_not_allowed", f"the token belongs to agent {first.agent_id!r}")
    if first.permission == "read":
        token = result(GROUP, "token", Status.WARN,
                       f"accepted for account {first.account_id}, agent {first.agent_id}, but "
                       "read-only: cameras are reported, never published",
                       "create a publisher token with publish permission in TheRelay Dashboard")
    else:
        token = result(GROUP, "token", Status.OK,
                       f"accepted: account {first.account_id}, agent {first.agent_id}, "
                       f"permission {first.permission} ({first.token_scope} token)")
    return [token, judge_skew(round(now - first.server_time, 3), "its welcome")]


def _unreachable(url: str, why: str) -> list[Result]:
    return [result(GROUP, "token", Status.FAIL, f"cannot reach the relay at {url}: {why}",
                   "check relay.url, this machine's DNS and that outbound HTTPS (443) is "
                   "allowed; the agent keeps serving the LAN and retries by itself"),
            result(GROUP, "clock", Status.SKIP, "no session with the relay")]


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
