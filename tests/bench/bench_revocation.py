"""Benchmark: time from a revocation (or an expiry) to the end of the live session.

The revocation is made through a second store connection, exactly as the CLI (another
process) makes it; the daemon side is the real AccessService. Goal: every session ends
within 1 s. Run: ``make bench`` or ``.venv/bin/python tests/bench/bench_revocation.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

from agent import app, logs, stores
from agent.access.model import Scope
from agent.access.tokens import Kind
from agent.config import load

ROUNDS = 30


async def main() -> None:
    logs.configure("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        config = load(None, {"THERELAY_STATE_DIR": tmp, "THERELAY_AGENT_ID": "site1"})
        store = stores.open_store(config)
        cli_store = stores.open_store(config)  # stands for the CLI process
        access = app.build_access(config, store)
        await access.start()
        revoke_lat: list[float] = []
        expire_lat: list[float] = []
        for i in range(ROUNDS):
            expiring = i % 2 == 1
            now = time.time()
            new = await asyncio.to_thread(
                cli_store.create, Kind.ACCESS, Scope.parse("camera:demo"), now,
                ttl=0.5 if expiring else None)
            while access.token(new.record.id) is None:
                await asyncio.sleep(0.01)
            ended = asyncio.Event()
            stamp: list[float] = []
            decision = access.authorize(new.token, "demo", "webrtc", "127.0.0.1")
            assert decision.granted, decision.reason

            def close(_reason: str, ended: asyncio.Event = ended,
                      stamp: list[float] = stamp) -> None:
                stamp.append(time.time())
                ended.set()

            access.open_session(decision, "demo", "webrtc", "127.0.0.1", close)
            if expiring:
                deadline = new.record.expires_at or 0.0
            else:
                await asyncio.sleep(0.05 + (i % 7) * 0.03)  # land anywhere in the poll cycle
                deadline = time.time()
                await asyncio.to_thread(cli_store.revoke, new.record.id, deadline, "bench")
            await asyncio.wait_for(ended.wait(), 5)
            (expire_lat if expiring else revoke_lat).append(stamp[0] - deadline)
        await access.stop()
        store.close()
        cli_store.close()
    for name, lat in (("revocation from another process", revoke_lat),
                      ("expiry", expire_lat)):
        q = statistics.quantiles(lat, n=20)
        print(f"{name:<33} → session ended: n={len(lat)}  p50 {statistics.median(lat) * 1000:.0f}"
              f" ms  p95 {q[18] * 1000:.0f} ms  max {max(lat) * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
