"""Composition root: the one place that builds the agent's objects and wires them together."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import timedelta

import structlog

from agent import __version__
from agent.access.db import db_path
from agent.access.model import Scope, ScopeLevel, Status, format_time
from agent.access.policy import FailureLimiter, Site
from agent.access.recorder import AccessRecorder
from agent.access.service import AccessService
from agent.access.store import NewToken, TokenStore
from agent.access.tokens import Kind
from agent.config import Config, publisher_token
from agent.errors import AgentError
from agent.http import server

log = structlog.get_logger(__name__)

QUICK_START_LABEL = "quick-start"
QUICK_START_TTL = timedelta(days=1)


def open_store(config: Config) -> TokenStore:
    """The token store for ``config``: its site identity, limit and known cameras."""
    site = Site(config.agent.id, config.agent.account_id)
    cameras = frozenset(config.camera_ids)
    return TokenStore(db_path(config.state_dir), site, config.tokens.max_active, lambda: cameras)


def build_access(config: Config, store: TokenStore) -> AccessService:
    fa = config.tokens.failed_attempts
    recorder = AccessRecorder(
        db_path(config.state_dir),
        max_ips=config.tokens.max_ips_per_token,
        flush_interval=config.audit.flush_interval,
    )
    return AccessService(
        store, recorder, FailureLimiter(fa.burst, fa.per_minute, fa.max_ips),
        retention_days=config.audit.retention_days,
    )


def quick_start_token(config: Config, store: TokenStore, now: float) -> NewToken:
    """A fresh 24-hour viewer token for the first camera; earlier quick-start tokens revoked."""
    for old in store.list_tokens(now, kind=Kind.ACCESS, status=Status.ACTIVE):
        if old.label == QUICK_START_LABEL and old.created_by == QUICK_START_LABEL:
            store.revoke(old.id, now, actor=QUICK_START_LABEL)
    return store.create(
        Kind.ACCESS, Scope(ScopeLevel.CAMERA, config.cameras[0].id), now,
        ttl=QUICK_START_TTL.total_seconds(),
        label=QUICK_START_LABEL, created_by=QUICK_START_LABEL,
    )


async def run(config: Config, *, quick_start: bool) -> int:
    """Run the daemon until SIGINT/SIGTERM. Returns the process exit status."""
    publisher_token(config)  # fail early on a bad token file; the relay link uses it later
    store = await asyncio.to_thread(open_store, config)
    access = build_access(config, store)
    started = time.time()
    if quick_start and config.cameras:
        new = await asyncio.to_thread(quick_start_token, config, store, started)
        print(f"Quick-start access token for camera '{config.cameras[0].id}' "
              f"(valid until {format_time(new.record.expires_at)}, shown once):\n"
              f"  {new.token}", flush=True)
    await access.start()

    def health() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "agent_id": config.agent.id,
                "uptime_s": round(time.time() - started, 1),
                "sessions": len(access.sessions)}

    host, port = config.http.host_port
    try:
        runner = await server.start(server.make_app(health), host, port)
    except OSError as exc:
        await access.stop()
        store.close()
        raise AgentError(
            f"cannot listen on {config.http.listen}: {exc.strerror}. Another program may use "
            "the port: change http.listen."
        ) from None
    log.info("agent_started", version=__version__, agent_id=config.agent.id,
             listen=config.http.listen, state_dir=str(config.state_dir),
             cameras=config.camera_ids, config=config.origin)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("agent_stopping")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await access.stop()
        store.close()
    log.info("agent_stopped")
    return 0
