"""Benchmark: authorize() decisions per second and latency with 100,000 tokens in the store.

Run: ``make bench`` (or ``.venv/bin/python tests/bench/bench_authorize.py [--tokens N]``).
Goal: >= 100,000 decisions/s on one core for the cached (in-memory index) path.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.access.index import TokenIndex
from agent.access.model import Action, Protocol
from agent.access.policy import AccessRequest, Decision, FailureLimiter, Site, authorize
from agent.access.recorder import AccessRecorder
from agent.access.store import TokenStore
from agent.access.tokens import Kind, generate, token_hash
from agent.state.database import StateDB
from agent.state.db import next_rev

SITE = Site("site1", "acme")


def fill(store: TokenStore, n: int, now: float) -> list[str]:
    """Insert ``n`` camera tokens in one transaction (the CLI would take minutes)."""
    tokens = [generate(Kind.ACCESS) for _ in range(n)]

    def work(conn: sqlite3.Connection) -> None:
        rev = next_rev(conn)
        conn.executemany(
            "INSERT INTO tokens (id, kind, scope, secret_hash, last4, created_at, rev) "
            "VALUES (?, 'access', ?, ?, ?, ?, ?)",
            [(t.public_id, f"camera:cam{i % 16}", token_hash(t.text), t.text[-4:], now, rev)
             for i, t in enumerate(tokens)],
        )

    store.write(work)
    return [t.text for t in tokens]


def measure(name: str, decide: Callable[[AccessRequest], Decision],
            requests: list[AccessRequest], expect: str) -> None:
    assert decide(requests[0]).reason.value == expect, decide(requests[0])
    for r in requests[:2000]:  # warm up
        decide(r)
    start = time.perf_counter()
    for r in requests:
        decide(r)
    elapsed = time.perf_counter() - start
    lat = []
    clock = time.perf_counter_ns
    for r in requests[:50_000]:
        t0 = clock()
        decide(r)
        lat.append(clock() - t0)
    q = statistics.quantiles(lat, n=100)
    print(f"{name:<34} {len(requests) / elapsed:>12,.0f}/s   p50 {q[49] / 1000:6.2f} µs"
          f"   p99 {q[98] / 1000:6.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(StateDB(Path(tmp) / "agent.db"), SITE, args.tokens + 1, frozenset)
        t0 = time.perf_counter()
        texts = fill(store, args.tokens, now)
        t1 = time.perf_counter()
        rows, _ = store.load_rows()
        index = TokenIndex(rows)  # as the access service holds it
        t2 = time.perf_counter()
        print(f"store: {args.tokens:,} tokens inserted in {t1 - t0:.2f} s, "
              f"index loaded in {t2 - t1:.2f} s")
        rng = random.Random(7)
        cams = {t: f"cam{i % 16}" for i, t in enumerate(texts)}
        picks = [rng.choice(texts) for _ in range(args.requests)]
        granted = [AccessRequest(t, cams[t], Action.VIEW, Protocol.WEBRTC, "10.0.0.1", now)
                   for t in picks]
        unknown = [AccessRequest(generate(Kind.ACCESS).text, "cam1", Action.VIEW,
                                  Protocol.WEBRTC, "10.0.0.1", now)
                   for _ in range(args.requests // 4)] * 4
        malformed = [AccessRequest(f"not-a-token-{i}", "cam1", Action.VIEW, Protocol.WEBRTC,
                                   "10.0.0.1", now)
                     for i in range(args.requests)]

        def plain(req: AccessRequest) -> Decision:
            return authorize(req, index, SITE)

        print(f"authorize() on one core, {args.requests:,} requests each:")
        measure("granted", plain, granted, "granted")
        # The same few tokens again and again (a site's usual viewers): their records are
        # kept built by the index (agent/access/index.py HOT); above, nearly every lookup
        # builds one from its row.
        few = set(picks[:100])
        hot = [r for r in granted if r.token in few][:10_000] * 20
        measure("granted, 100 tokens in turn", plain, hot, "granted")
        measure("denied: unknown", plain, unknown, "unknown")
        measure("denied: malformed", plain, malformed, "malformed")

        # The daemon's full path: decision + per-IP limiter + audit/usage recording (the
        # recorder's thread is not started, so this measures only the event-loop side).
        limiter = FailureLimiter(burst=10**9, per_minute=10**9)
        recorder = AccessRecorder(store.path, max_ips=100, max_pending=10**7)

        def full(req: AccessRequest) -> Decision:
            decision = authorize(req, index, SITE, limiter)
            recorder.record_decision(req, decision)
            return decision

        print("with limiter and audit/usage recording (event-loop side):")
        measure("granted + recorded", full, granted, "granted")
        measure("denied: unknown + recorded", full, unknown, "unknown")
        pending = len(recorder._pending)
        t3 = time.perf_counter()
        recorder.close()
        t4 = time.perf_counter()
        print(f"recorder: {pending:,} events written in one batch in {t4 - t3:.2f} s "
              f"({pending / (t4 - t3):,.0f} events/s)")
        store.close()


if __name__ == "__main__":
    main()
