"""Benchmark: SIGTERM to exit of the real daemon with 1, 5 and 20 live WHEP viewers, and
what the durable grant costs a request.

Requirement behind it: exit within 5 s (systemd's stop timeout), every session audited as
ended by ``shutdown``. The grant figures compare a granted request (answered only after its
audit entry is committed) with a denied one (batched) on the same endpoint.
Run: ``.venv/bin/python -m tests.bench.bench_stop``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.agent import AgentProcess, WhepViewer

ROUNDS = 3
VIEWERS = (1, 5, 20)
REQUESTS = 300
SMALL = "testsrc://?size=320x240&fps=15&gop=1"

# The tests' conftest turns asyncio debug mode on for every process; a benchmark measures
# the daemon as it runs in production.
os.environ.pop("PYTHONASYNCIODEBUG", None)


async def one_stop(viewers: int) -> tuple[float, int]:
    """Seconds from SIGTERM to exit with ``viewers`` live viewers, and sessions audited."""
    with tempfile.TemporaryDirectory() as tmp:
        agent = await AgentProcess.start(Path(tmp), [{"id": "cam1", "source": SMALL}])
        _, token = await agent.token("--camera", "cam1")
        peers = [WhepViewer(agent.base, "cam1", token, audio=False) for _ in range(viewers)]
        statuses = await asyncio.gather(*(p.connect() for p in peers))
        assert all(s == 201 for s in statuses), statuses
        await asyncio.gather(*(p.frame(20) for p in peers))
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.proc.wait, 30)
        elapsed = time.monotonic() - started
        assert code == 0
        await asyncio.gather(*(p.close() for p in peers))
        await agent.stop()
        ended = await agent.audit("--event", "session.ended",
                                        "--reason", "shutdown")
        return elapsed, len(ended)


async def grant_latency() -> tuple[list[float], list[float]]:
    """Latency of granted vs denied GET /api/v1/cameras, sequential, in ms."""
    with tempfile.TemporaryDirectory() as tmp:
        # The failure limiter off: every denial takes the same path as the grants.
        limits = {"failed_attempts": {"burst": 100_000, "per_minute": 100_000}}
        agent = await AgentProcess.start(Path(tmp), [{"id": "cam1", "source": SMALL}],
                                         tokens=limits)
        try:
            _, token = await agent.token("--host")
            granted: list[float] = []
            denied: list[float] = []
            async with aiohttp.ClientSession() as http:
                for i in range(REQUESTS):
                    good = i % 2 == 0
                    # Denied: the same token with its last character changed (corrupted).
                    header = token if good else token[:-1] + ("x" if token[-1] != "x" else "y")
                    started = time.perf_counter()
                    async with http.get(f"{agent.base}/api/v1/cameras",
                                        headers={"Authorization": f"Bearer {header}"}) as r:
                        await r.read()
                    (granted if good else denied).append((time.perf_counter() - started) * 1000)
                    assert (r.status == 200) == good, r.status
        finally:
            await agent.stop()
        return granted, denied


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def main() -> None:
    print(f"SIGTERM -> exit, {ROUNDS} rounds each (limit 5 s)")
    for n in VIEWERS:
        times: list[float] = []
        for _ in range(ROUNDS):
            elapsed, ended = await one_stop(n)
            assert ended == n, f"{ended} of {n} sessions audited as ended by shutdown"
            times.append(elapsed)
        print(f"  {n:2d} viewer(s): median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")
    granted, denied = await grant_latency()
    print(f"GET /api/v1/cameras, {REQUESTS // 2} each, sequential:")
    print(f"  granted (audit committed first): p50 {pct(granted, 0.5):.1f} ms, "
          f"p95 {pct(granted, 0.95):.1f} ms")
    print(f"  denied (batched):                p50 {pct(denied, 0.5):.1f} ms, "
          f"p95 {pct(denied, 0.95):.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
