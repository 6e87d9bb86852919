"""SIGHUP: cameras added, removed or changed without touching viewers of the others."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp
import yaml

from tests.support.agent import AgentProcess, WhepViewer, wait_until

SMALL = "testsrc://?size=320x240&fps=15&gop=1"


async def listed(agent: AgentProcess, token: str) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/api/v1/cameras", headers={"Authorization": f"Bearer {token}"}) as r:
        return [c["id"] for c in json.loads(await r.read())["cameras"]]


async def test_reload_applies_camera_changes_and_keeps_unchanged_viewers(
        tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL},
                                     {"id": "cam2", "source": SMALL}])
    try:
        _, token = await agent.token("--host")
        keep = WhepViewer(agent.base, "cam1", token)
        gone = WhepViewer(agent.base, "cam2", token)
        assert await keep.connect() == 201 and await gone.connect() == 201
        await keep.frame()
        await gone.frame()
        config = yaml.safe_load(agent.config_path.read_text())
        config["cameras"] = [{"id": "cam1", "source": SMALL},
                             {"id": "cam3", "name": "New", "source": SMALL}]
        agent.config_path.write_text(yaml.safe_dump(config))
        agent.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any(e.get("event") == "reloaded" for e in agent.log_events()),
                         10)
        assert await listed(agent, token) == ["cam1", "cam3"]
        for _ in range(10):  # the unchanged camera's viewer never noticed
            await keep.frame()
        assert keep.pc.connectionState == "connected"
        await wait_until(lambda: gone.pc.connectionState in ("closed", "failed"), 10)
        ended = await agent.audit("--event", "session.ended",
                                        "--camera", "cam2")
        assert ended[0]["reason"] == "camera_removed"
        # An invalid file on reload keeps the running configuration.
        agent.config_path.write_text("cameras: [")
        agent.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any(e.get("event") == "reload_failed"
                                     for e in agent.log_events()), 10)
        assert await listed(agent, token) == ["cam1", "cam3"]
        await keep.frame()
        await keep.close()
        await gone.close()
    finally:
        assert await agent.stop() == 0
