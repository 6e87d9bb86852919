"""Benchmark: denials per second from one address with the audit aggregation on, and the
daemon's event-loop lag meanwhile.

Goal: event-loop lag p99 <= 20 ms while one client sends bad requests as fast as it can;
the audit log grows by a few rows, not one per request.

The daemon runs in its own process (the real ``agent.app.run``) with a 10 ms lag probe added
to its loop by a small harness (probes are time-stamped with CLOCK_MONOTONIC, which the
processes share, and only those taken under load count); a load process sends
unauthenticated snapshot requests over 32 keep-alive connections from 127.0.0.1 (loopback
only). Each round is a fresh daemon.
Run: ``.venv/bin/python -m tests.bench.bench_denials [--seconds 10] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from tests.support.netns import free_port

# The tests' conftest turns asyncio debug mode on; a benchmark measures production.
os.environ.pop("PYTHONASYNCIODEBUG", None)

HARNESS = r'''
import asyncio, json, sys, time
from pathlib import Path
from agent import app, logs
from agent.config import load

PROBE = 0.01

async def main(config_path, out):
    config = load(Path(config_path))
    logs.configure("json", "warning")
    samples = []
    async def probe():
        while True:
            before = time.monotonic()
            await asyncio.sleep(PROBE)
            now = time.monotonic()
            samples.append((now, max(0.0, now - before - PROBE)))
    task = asyncio.create_task(probe())
    try:
        await app.run(config, quick_start=False)
    finally:
        task.cancel()
        Path(out).write_text(json.dumps(samples))

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''

LOAD = r'''
import asyncio, json, sys, time
import aiohttp

async def main(url, seconds, concurrency):
    counts = {}
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker():
            while time.monotonic() < deadline:
                async with http.get(url) as r:
                    await r.read()
                    counts[r.status] = counts.get(r.status, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps(counts))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
'''


def audit_rows(state: Path) -> int:
    conn = sqlite3.connect(state / "agent.db")
    try:
        return int(conn.execute("SELECT count(*) FROM audit WHERE event = 'access.denied'")
                   .fetchone()[0])
    finally:
        conn.close()


async def wait_healthy(base: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError("the daemon exited")
            try:
                async with http.get(f"{base}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the daemon never became healthy")


async def one_round(seconds: float, concurrency: int) -> tuple[float, list[float], int, int]:
    """(denials/s, lag samples during the load, audit rows of denials, requests)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "agent": {"id": "bench"}, "http": {"listen": f"127.0.0.1:{port}"},
            "state_dir": str(root / "state"), "webrtc": {"host_addresses": ["127.0.0.1"]},
            "discovery": {"enabled": False, "advertise": False},
            "cameras": [{"id": "cam1", "source": "testsrc://?size=160x120&fps=5"}]}))
        lag_file = root / "lag.json"
        env = {**os.environ, "THERELAY_CONFIG": str(config)}
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HARNESS, str(config), str(lag_file), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, daemon)
        await asyncio.sleep(1.0)  # let start-up work settle
        started = time.monotonic()
        load = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOAD, f"{base}/snapshot/cam1.jpg", str(seconds),
            str(concurrency), stdout=subprocess.PIPE)
        out, _ = await load.communicate()
        elapsed = time.monotonic() - started
        counts = {int(k): v for k, v in json.loads(out).items()}
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait()
        samples = json.loads(lag_file.read_text())
        # CLOCK_MONOTONIC is shared by the processes: keep the probes taken under load
        during = [lag for at, lag in samples if started + 0.5 <= at <= started + elapsed - 0.5]
        denied = sum(n for status, n in counts.items() if status in (401, 429))
        return denied / elapsed, during, audit_rows(root / "state"), sum(counts.values())


def spread(values: list[float]) -> str:
    return (f"min {min(values):,.1f}  median {statistics.median(values):,.1f}  "
            f"max {max(values):,.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    rates, p99s, maxes, rows, requests = [], [], [], [], []
    for _ in range(args.rounds):
        rate, lags, denied_rows, sent = await one_round(args.seconds, args.concurrency)
        q = statistics.quantiles(lags, n=100) if len(lags) >= 100 else [max(lags)] * 99
        rates.append(rate)
        p99s.append(q[98] * 1000)
        maxes.append(max(lags) * 1000)
        rows.append(denied_rows)
        requests.append(sent)
    print(f"denials/s from one address ({args.rounds} rounds of {args.seconds:.0f} s, "
          f"{args.concurrency} connections): {spread(rates)}")
    print(f"event-loop lag p99 (ms): {spread(p99s)}   (goal <= 20)")
    print(f"event-loop lag max (ms): {spread(maxes)}")
    print(f"audit rows for {statistics.median(requests):,.0f} denied requests: "
          f"{spread([float(r) for r in rows])}")


if __name__ == "__main__":
    asyncio.run(main())
