"""Graceful stop: SIGTERM ends sessions (audited), DELETEs WHIP sessions and exits within 5 s.

5 s is a requirement, not a performance goal: it is the stop timeout the systemd unit gives
the agent before it sends SIGKILL (an unclean stop loses the in-memory audit tail and leaves
WHIP resources behind at the relay). Each test prints the measured time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import remember, write_secret
from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.fake_relay import FakeRelay, Message
from tests.support.netns import free_port

SMALL = "testsrc://?size=320x240&fps=15&gop=1"
STOP_LIMIT = 5.0  # systemd's stop timeout for the unit (TimeoutStopSec)


async def sigterm(agent: AgentProcess, what: str) -> float:
    """SIGTERM the daemon, wait for it, check it exited 0 and cleanly; the time it took."""
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(agent.proc.wait, 15)
    finally:
        elapsed = time.monotonic() - started
        print(f"\nSIGTERM -> exit ({what}): {elapsed:.2f} s")
    assert code == 0
    assert await agent.stop() == 0  # no traceback, no blocked loop
    assert elapsed < STOP_LIMIT, f"stopping took {elapsed:.2f} s (limit {STOP_LIMIT} s)"
    return elapsed


async def verified(agent: AgentProcess) -> None:
    result = await agent.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


@contextlib.asynccontextmanager
async def silent_camera() -> AsyncIterator[str]:
    """An RTSP URL whose server accepts the connection and never answers (a hung camera)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"rtsp://127.0.0.1:{port}/stream"
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_sigterm_with_a_live_viewer_ends_its_session_as_shutdown(tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL}])
    try:
        token_id, token = await agent.token("--camera", "cam1")
        viewer = WhepViewer(agent.base, "cam1", token)
        assert await viewer.connect() == 201
        await viewer.frame()
        await sigterm(agent, "1 live WHEP viewer")
        await viewer.close()
    finally:
        if agent.proc.poll() is None:
            await agent.stop()
    ended = await agent.audit("--token", token_id, "--event",
                                    "session.ended")
    assert [e["reason"] for e in ended] == ["shutdown"]
    assert ended[0]["detail"]["bytes"] > 0
    await verified(agent)


async def test_sigterm_deletes_the_whip_session_at_the_relay(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        secret = tmp_path / "publisher-token.secret"
        write_secret(secret, relay.issue_publisher(agent_id="nvr1") + "\n")
        agent = await AgentProcess.start(
            tmp_path, [{"id": "cam1", "source": SMALL}], agent={"id": "nvr1", "account_id": "acme"},
            relay={"url": relay.url, "publisher_token_file": str(secret)})
        try:
            await relay.wait_agent(timeout=20)
            session = await relay.publish("cam1")
            await relay.wait_status(session, "live", timeout=20)
            await relay.whip_frame(session)
            await sigterm(agent, "relay link + 1 WHIP publish")
            deleted = await relay.wait_whip_deleted(session, timeout=1)
            assert deleted is not None
        finally:
            if agent.proc.poll() is None:
                await agent.stop()
        assert relay.violations == []
    await verified(agent)


async def test_sigterm_while_a_camera_hangs_and_a_viewer_is_negotiating(
        tmp_path: Path) -> None:
    refused = f"rtsp://127.0.0.1:{free_port()}/nothing-listens"
    async with silent_camera() as hung:
        agent = await AgentProcess.start(tmp_path, [
            {"id": "hung", "source": hung, "always_on": True},
            {"id": "gone", "source": refused, "always_on": True},
            {"id": "slow", "source": hung}],
            media={"camera_timeout": 30.0})
        try:
            _, token = await agent.token("--host")
            await wait_until(lambda: any(e.get("event") == "camera_unavailable"
                                         for e in agent.log_events()), 15)
            # A viewer whose offer is in flight: the agent is waiting for the camera to
            # come online before it answers.
            viewer = WhepViewer(agent.base, "slow", token)
            negotiating = asyncio.create_task(viewer.connect())
            await asyncio.sleep(1.0)
            assert not negotiating.done()
            await sigterm(agent, "hung camera, refused camera, viewer mid-offer")
            with contextlib.suppress(aiohttp.ClientError):
                await negotiating
            assert viewer.status != 201
            await viewer.close()
        finally:
            if agent.proc.poll() is None:
                await agent.stop()
    await verified(agent)


# -- SIGKILL: nothing acknowledged is lost ----------------------------------------------------
#
# The promise (docs/tokens.md section 10): a token change is committed with its audit entry
# before the CLI prints the token or the admin API answers; a request the agent granted is
# answered only after its access.granted entry and usage count are committed. Denials and
# session ends are batched (audit.flush_interval) and may lose their last second to a crash.


@dataclass
class Acknowledged:
    created: dict[str, str] = field(default_factory=dict)  # token id -> "cli" | "api"
    revoked: set[str] = field(default_factory=set)
    rotated: dict[str, str] = field(default_factory=dict)  # old id -> new id (grace 1h)
    granted: Counter[str] = field(default_factory=Counter)  # protocol -> answered grants
    admin_answers: int = 0  # admin API answers under a granted admin token

    def made(self, token_id: str, how: str) -> None:
        self.created[token_id] = how


async def cli_worker(agent: AgentProcess, acked: Acknowledged, stop: asyncio.Event) -> None:
    mine: list[str] = []
    step = 0
    while not stop.is_set():
        step += 1
        if step % 3 == 0 and mine:
            old = mine.pop(0)
            done = await agent.cli("token", "rotate", old, "--grace", "1h",
                                           "--json")
            if done.returncode == 0:
                new = json.loads(done.stdout)["id"]
                acked.rotated[old] = new
                acked.made(new, "cli")
        elif step % 3 == 2 and mine:
            old = mine.pop(0)
            done = await agent.cli("token", "revoke", old)
            if done.returncode == 0:
                acked.revoked.add(old)
        else:
            done = await agent.cli("token", "create", "--camera", "cam1",
                                           "--json", "--label", "crash-cli")
            if done.returncode == 0 and json.loads(done.stdout).get("token"):
                token_id = json.loads(done.stdout)["id"]
                acked.made(token_id, "cli")
                mine.append(token_id)


async def api_worker(agent: AgentProcess, admin: str, acked: Acknowledged,
                     stop: asyncio.Event) -> None:
    base = f"{agent.base}/api/v1/admin/tokens"
    headers = {"Authorization": f"Bearer {admin}"}
    mine: list[str] = []
    step = 0
    async with aiohttp.ClientSession(headers=headers) as http:
        while not stop.is_set():
            step += 1
            try:
                if step % 3 == 0 and mine:
                    old = mine.pop(0)
                    async with http.post(f"{base}/{old}/rotate", json={"grace": "1h"}) as r:
                        text = await r.text()
                        if r.status == 201:
                            remember(text)
                            acked.rotated[old] = json.loads(text)["id"]
                            acked.made(json.loads(text)["id"], "api")
                elif step % 3 == 2 and mine:
                    old = mine.pop(0)
                    async with http.post(f"{base}/{old}/revoke") as r:
                        await r.read()
                        if r.status == 200:
                            acked.revoked.add(old)
                else:
                    async with http.post(base, json={"scope": "camera:cam1",
                                                     "label": "crash-api"}) as r:
                        text = await r.text()
                        if r.status == 201:
                            remember(text)
                            mine.append(json.loads(text)["id"])
                            acked.made(mine[-1], "api")
                if r.status not in (401, 403, 429):
                    acked.admin_answers += 1
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)  # the daemon is gone: nothing was acknowledged


async def usage_worker(agent: AgentProcess, token: str, acked: Acknowledged,
                       stop: asyncio.Event) -> None:
    """Snapshots (granted), and denied attempts with a corrupted and a made-up token."""
    good = {"Authorization": f"Bearer {token}"}
    bad = [{"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": "Bearer nonsense"}]
    step = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            step += 1
            try:
                if step % 4 == 0:
                    async with http.get(f"{agent.base}/snapshot/cam1.jpg",
                                        headers=bad[step % 8 // 4]) as r:
                        await r.read()
                    continue
                async with http.get(f"{agent.base}/snapshot/cam1.jpg", headers=good) as r:
                    await r.read()
                    if r.status == 200:
                        acked.granted["snapshot"] += 1
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)


async def whep_worker(agent: AgentProcess, token: str, acked: Acknowledged,
                      stop: asyncio.Event) -> None:
    while not stop.is_set():
        viewer = WhepViewer(agent.base, "cam1", token, audio=False)
        try:
            if await viewer.connect() == 201:
                acked.granted["webrtc"] += 1
                await viewer.delete()
        except (TimeoutError, aiohttp.ClientError):
            await asyncio.sleep(0.05)
        finally:
            await viewer.close()


async def export(agent: AgentProcess) -> list[dict[str, Any]]:
    done = await agent.cli("audit", "--export", "jsonl")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def test_sigkill_during_heavy_activity_loses_nothing_acknowledged(
        tmp_path: Path) -> None:
    cameras = [{"id": "cam1", "source": SMALL}]
    sections: dict[str, Any] = {"audit": {"flush_interval": 1.0},  # the shipped default
                                "tokens": {"max_active": 100_000}}
    agent = await AgentProcess.start(tmp_path, cameras, **sections)
    admin_id, admin = await agent.token("--admin")
    viewer_id, viewer = await agent.token("--camera", "cam1")
    acked = Acknowledged()
    stop = asyncio.Event()
    workers = [asyncio.create_task(w) for w in (
        cli_worker(agent, acked, stop), api_worker(agent, admin, acked, stop),
        api_worker(agent, admin, acked, stop), usage_worker(agent, viewer, acked, stop),
        usage_worker(agent, viewer, acked, stop), whep_worker(agent, viewer, acked, stop))]
    moment = random.uniform(2.0, 5.0)
    await asyncio.sleep(moment)
    agent.proc.kill()
    await asyncio.to_thread(agent.proc.wait, 10)
    stop.set()
    await asyncio.gather(*workers)
    await agent.stop()  # already dead: checks its log only
    print(f"\nSIGKILL after {moment:.2f} s: {len(acked.created)} tokens created, "
          f"{len(acked.revoked)} revoked, {len(acked.rotated)} rotated, grants answered "
          f"{dict(acked.granted)}, admin answers {acked.admin_answers}")
    assert acked.created and acked.granted["snapshot"] and acked.admin_answers

    again = await AgentProcess.start(tmp_path, cameras, **sections)  # same state
    try:
        await nothing_acknowledged_lost(again, acked, admin_id, viewer_id)
    finally:
        assert await again.stop() == 0


async def nothing_acknowledged_lost(agent: AgentProcess, acked: Acknowledged, admin_id: str,
                              viewer_id: str) -> None:
    """Every acknowledged change and grant is in the store and the audit log; it verifies."""
    await verified(agent)
    listed = await agent.cli("token", "list", "--json")
    tokens = {t["id"]: t for t in json.loads(listed.stdout)}
    assert set(acked.created) <= set(tokens)
    for token_id in acked.revoked:
        assert tokens[token_id]["status"] == "revoked", token_id
    for old, new in acked.rotated.items():
        assert tokens[old]["replaced_by"] == new
        assert tokens[old]["status"] == "active" and tokens[old]["expires_at"]  # its grace
        assert tokens[new]["replaces"] == old
    entries = await export(agent)
    by_event: dict[str, set[str]] = {}
    for e in entries:
        by_event.setdefault(e["event"], set()).add(e["token_id"])
    assert set(acked.created) <= by_event["token.created"]
    assert acked.revoked <= by_event["token.revoked"]
    assert set(acked.rotated) <= by_event["token.rotated"]
    granted = Counter(e["protocol"] for e in entries
                      if e["event"] == "access.granted" and e["token_id"] == viewer_id)
    for protocol, answered in acked.granted.items():
        assert granted[protocol] >= answered, (protocol, granted, acked.granted)
    admin_granted = sum(1 for e in entries
                        if e["event"] == "access.granted" and e["token_id"] == admin_id)
    assert admin_granted >= acked.admin_answers
    stats = json.loads((await agent.cli("stats", viewer_id, "--json")).stdout)
    assert stats["uses"] >= sum(acked.granted.values())


async def relay_agent(tmp: Path, relay: FakeRelay, token: str) -> AgentProcess:
    secret = tmp / "publisher-token.secret"
    write_secret(secret, token + "\n")
    return await AgentProcess.start(
        tmp, [{"id": "cam1", "source": SMALL}], agent={"id": "nvr1", "account_id": "acme"},
        relay={"url": relay.url, "publisher_token_file": str(secret)})


def outbox(agent: AgentProcess) -> dict[str, str]:
    """The relay usage bookmarks in the agent's state database (read-only look)."""
    db = Path(agent.env["THERELAY_STATE_DIR"]) / "agent.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'relay_usage%'"))


async def snapshots(agent: AgentProcess, token: str, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            async with http.get(f"{agent.base}/snapshot/cam1.jpg",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200


async def test_usage_batches_across_sigkill_are_counted_once(tmp_path: Path) -> None:
    """Acknowledged batches are not sent again after a SIGKILL; an unacknowledged one is
    resent under its name with the same events, even though more were written since."""
    async with FakeRelay() as relay:
        publisher = relay.issue_publisher(agent_id="nvr1")
        agent = await relay_agent(tmp_path, relay, publisher)
        again: AgentProcess | None = None
        try:
            await relay.wait_agent(timeout=20)
            text, record = relay.issue_access_token("host:nvr1")
            sync = await relay.send_tokens([record])
            assert sync is not None
            await relay.wait_ack(sync)

            def mine() -> list[Message]:
                return [e for e in relay.usage_events if e["token_id"] == record["id"]]

            await snapshots(agent, text, 3)  # acknowledged before the kill
            await wait_until(lambda: len(mine()) == 3, 20)
            for _ in range(100):  # the agent has recorded the relay's ack
                if "relay_usage_pending" not in await asyncio.to_thread(outbox, agent):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the acknowledged batch is still outstanding")
            relay.ack_usage = False
            mark = len(relay.received)
            await snapshots(agent, text, 2)  # sent, never acknowledged
            pending = await relay.wait_for(
                "usage", lambda m: any(e["token_id"] == record["id"] for e in m["events"]),
                since=mark, timeout=20)
            await snapshots(agent, text, 2)  # written after that batch went out
            agent.proc.kill()
            await asyncio.to_thread(agent.proc.wait, 10)
            await agent.stop()
            relay.ack_usage = True
            relay.restarted()  # a new process, not a retry: it may connect at once
            mark = len(relay.received)
            again = await relay_agent(tmp_path, relay, publisher)
            resent = await relay.wait_for("usage", since=mark, timeout=30)
            assert resent["batch"] == pending["batch"]
            assert resent["events"] == pending["events"]
            await wait_until(lambda: len(mine()) >= 7, 30)
            granted = await again.audit("--token", record["id"], "--event", "access.granted")
            assert sorted(e["ts"] for e in mine()) == sorted(e["ts"] for e in granted)
            assert len(granted) == 7
            batches = [m["batch"] for m in relay.received if m["type"] == "usage"]
            print(f"\nusage batches sent: {batches}")
        finally:
            for process in (agent, again):
                if process is not None and process.proc.poll() is None:
                    await process.stop()
        assert relay.violations == []


WRITER = """
import sys, time
from pathlib import Path
from agent.access import audit
from agent.state.db import connect, transaction
conn = connect(Path(sys.argv[1]))
n = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0]) * 1000
print("ready", flush=True)
while True:  # big appends and prunes, back to back, as the daemon's writer and retention do
    with transaction(conn):
        audit.append(conn, [audit.AuditEntry(float(n + i), audit.DENIED, reason="malformed",
                                             peer_ip="10.0.0.1", detail={"i": n + i})
                            for i in range(300)])
    n += 300
    with transaction(conn):
        audit.prune(conn, float(n - 450), time.time(), actor="retention")
"""


def test_sigkill_in_the_middle_of_audit_writes_and_prunes_keeps_the_chain(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "THERELAY_STATE_DIR": str(state)}
    rng = random.Random()
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state / "agent.db")],
                                  env=env, stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.6))
        writer.kill()
        writer.wait(10)
        writer.stdout.close()
        result = subprocess.run([sys.executable, "-m", "agent", "audit", "verify"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        print(result.stdout.strip())
    with contextlib.closing(sqlite3.connect(state / "agent.db")) as conn:
        pruned = conn.execute("SELECT count(*) FROM audit WHERE event = 'audit.pruned'")
        assert pruned.fetchone()[0] > 0  # the kills did land among prunes too
