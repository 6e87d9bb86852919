"""The daemon notices its state database removed under it, however early that happens.

A test removed the file as soon as /healthz answered: the daemon's watch task had not yet
taken the file's identity, took that of "no file", and then found nothing wrong. The
identity is now taken when the database is opened, before anything is served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import app
from agent.app import Daemon
from agent.config import load
from agent.media.cameras import Cameras
from agent.stores import open_state


async def test_a_database_removed_before_the_first_check_is_noticed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load(None, {"THERELAY_STATE_DIR": str(tmp_path), "THERELAY_AGENT_ID": "site1"})
    cameras = Cameras(config.cameras, config.media)
    state = await asyncio.to_thread(open_state, config, lambda: cameras.ids)
    try:
        daemon = Daemon(config, state, cameras, None)
        for suffix in ("", "-wal", "-shm"):  # before the watch task first runs
            (tmp_path / f"agent.db{suffix}").unlink(missing_ok=True)
        monkeypatch.setattr(app, "DB_CHECK_INTERVAL", 0.01)
        watch = asyncio.create_task(daemon._watch_database())
        try:
            async with asyncio.timeout(5):
                while daemon.db_problem is None:
                    await asyncio.sleep(0.01)
        finally:
            watch.cancel()
        assert "was removed" in daemon.db_problem
        assert daemon.health()["status"] == "degraded"
    finally:
        state.close()
