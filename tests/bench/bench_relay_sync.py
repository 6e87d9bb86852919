"""Benchmark: a tokens.sync of 100,000 tokens through the real relay link, and the event loop.

The agent side is the real RelayLink, TokenStore and AccessService in this process, set up
as the daemon sets them up (``app.tune_interpreter()`` before they start); the relay is the fake
(tests/support/fake_relay.py) on 127.0.0.1 in **another process** (this file run with
``--relay``), so its own work (serialising 25 MB) is not counted as the agent's. A probe
asks to run every 5 ms and records how late it ran: first idle for a few seconds (the
machine's own scheduling noise), then from the sync's first byte to its ack.

Goal (docs/relay-protocol.md 1.2): the event loop is never more than 50 ms late (wall
clock, garbage collections included, whichever thread ran them), the sync applied and
acknowledged, memory bounded. Also reported: each event-loop step's CPU time (on a busy
machine much of the wall-clock lag is waiting for a CPU, or for the GIL held by a worker
thread), the full (generation 2) garbage collections, and how many objects the collector
tracks once the sync is done (the index keeps none per token: agent/access/index.py).
Run: ``make bench`` or ``.venv/bin/python -m tests.bench.bench_relay_sync [--runs N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration

from agent import app, logs, stores
from agent.config import load
from agent.relay.link import RelayLink
from tests.support.fake_relay import FakeRelay

TOKENS = 100_000
PROBE = 0.005
IDLE = 3.0
FRAGMENT = 1024 * 1024  # the relay sends a big message in 1 MiB WebSocket fragments


def records(count: int) -> list[dict[str, Any]]:
    return [{"id": f"T{n:011d}", "kind": "access",
             "sha256": hashlib.sha256(f"bench-{n}".encode()).hexdigest(), "last4": "abcd",
             "scope": "camera:door", "protocols": ["webrtc"], "expires_at": None,
             "revoked_at": None, "label": f"bench {n}"} for n in range(count)]


# -- the relay process --------------------------------------------------------------------


async def relay_process(count: int) -> None:
    """Print the URL and a publisher token, wait for ``go`` on stdin, send the sync to the
    connected agent, print ``acked <seconds>`` when the ack comes."""
    async with FakeRelay() as relay:
        relay.check_retries = False
        token = relay.issue_publisher(agent_id="nvr1")
        print(json.dumps({"url": relay.url, "token": token}), flush=True)
        await relay.wait_agent(timeout=30)
        await relay.wait_for("ack", timeout=30)  # the session's first (empty) sync
        mid, cursor = str(uuid.uuid4()), "c-bench"
        data = json.dumps({"type": "tokens.sync", "id": mid, "ts": time.time(),
                           "full": True, "cursor": cursor, "tokens": records(count)}).encode()
        relay.sent.append({"type": "tokens.sync", "id": mid, "cursor": cursor})
        print(json.dumps({"ready": len(data)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()
        await relay.send_raw(data, fragment=FRAGMENT)
        ack = await relay.wait_ack(mid, timeout=600)
        print(json.dumps({"acked": time.monotonic() - started, "ok": ack["ok"],
                          "cursor": ack.get("cursor")}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def witness_process() -> None:
    """The same 5 ms probe in an otherwise idle process, from start to a line on stdin: how
    late the machine alone makes a timer (its CPUs busy with other work) at the same time
    as the agent's; prints the late probes as JSON."""
    print("ready", flush=True)
    stopped = asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps(await _probed(None, stopped)), flush=True)


# -- the agent side -------------------------------------------------------------------------


async def _probe(late: list[tuple[float, float, float]], stop: asyncio.Event) -> None:
    """(start, end, lateness) of every probe that ran late."""
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(PROBE)
        after = time.perf_counter()
        if after - before - PROBE > 0.001:
            late.append((before, after, after - before - PROBE))


async def _probed(seconds: float | None, until: Any = None) -> list[tuple[float, float, float]]:
    late: list[tuple[float, float, float]] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(late, stop))
    if until is None:
        await asyncio.sleep(seconds or 0)
    else:
        await until
    stop.set()
    await probe
    return late


@contextlib.contextmanager
def _timing_steps(steps: list[tuple[float, float, float]]) -> Iterator[None]:
    """Record (start, end, CPU seconds) of every event-loop step that used more than 5 ms
    of CPU: the loop's own work, without the time it waited for a CPU or the GIL (on a
    busy machine those dominate the wall-clock lag and are not the agent's doing)."""
    original = asyncio.events.Handle._run

    def run(handle: asyncio.events.Handle) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            original(handle)
        finally:
            used = time.thread_time() - cpu
            if used > 0.005:
                steps.append((start, time.perf_counter(), used))
    asyncio.events.Handle._run = run  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        asyncio.events.Handle._run = original  # type: ignore[method-assign]


def _gc_timer(pauses: list[tuple[float, float]]) -> Any:
    """A gc callback recording when each full (generation 2) collection ran."""
    started = [0.0]

    def timer(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((started[0], time.perf_counter()))
    return timer


def _beyond(late: list[tuple[float, float, float]],
            witness: list[tuple[float, float, float]]) -> float:
    """Worst lateness of the agent's probe beyond the witness's at the same time
    (time.perf_counter is the system's monotonic clock, shared by both processes)."""
    return max((lag - max((w for s, e, w in witness if s < end and e > start), default=0.0)
                for start, end, lag in late), default=0.0)


def _lags(late: list[tuple[float, float, float]],
          pauses: list[tuple[float, float]]) -> tuple[float, float]:
    """Worst lateness, and worst lateness not spent in a full garbage collection."""
    worst = max((lag for _, _, lag in late), default=0.0)
    rest = max((lag - sum(max(0.0, min(end, e) - max(start, s)) for s, e in pauses)
                for start, end, lag in late), default=0.0)
    return worst, rest


async def _line(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), 600)
    if not line:
        raise RuntimeError("the relay process ended early")
    answer: dict[str, Any] = json.loads(line)
    return answer


async def measure(count: int, state_dir: Path) -> dict[str, float]:
    """One full tokens.sync of ``count`` tokens into a real link and store."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_relay_sync", "--relay", str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2])
    assert child.stdin is not None and child.stdout is not None
    config = load(None, {"THERELAY_STATE_DIR": str(state_dir), "THERELAY_AGENT_ID": "nvr1"})
    state = stores.open_state(config)
    store = state.tokens
    access = app.build_access(config, store)
    app.tune_interpreter()  # as the daemon does before it starts serving
    await access.start()
    try:
        relay = await _line(child.stdout)
        link = RelayLink(relay["url"], relay["token"], "nvr1", store, state.outbox, access, list,
                         lambda _: None, lambda _: RTCConfiguration(iceServers=[]))
        link.start()
        try:
            await _line(child.stdout)  # the sync is built
            gc.collect()  # a settled process: the start-up garbage is not the sync's
            tracked = len(gc.get_objects())
            idle = await _probed(IDLE)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            witness = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.bench_relay_sync", "--witness",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[2])
            assert witness.stdin is not None and witness.stdout is not None
            await witness.stdout.readline()
            pauses: list[tuple[float, float]] = []
            gc.callbacks.append(_gc_timer(pauses))
            steps: list[tuple[float, float, float]] = []
            try:
                with _timing_steps(steps):
                    child.stdin.write(b"go\n")
                    answer = asyncio.ensure_future(_line(child.stdout))
                    late = await _probed(None, answer)
            finally:
                gc.callbacks.pop()
            # Measured before this harness reads anything back itself.
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
            # All it printed, to its end: on a busy machine its late probes are a line
            # longer than a StreamReader's line limit (64 kB).
            printed, _ = await witness.communicate(b"stop\n")
            witnessed: list[tuple[float, float, float]] = [
                (s, e, w) for s, e, w in json.loads(printed)]
            done = answer.result()
            assert done["ok"] is True and done["cursor"] == "c-bench", done
            await access.refresh(force=True)
            indexed = len(access._tokens)
            gc.collect()
            tracked = len(gc.get_objects()) - tracked
            stored = await asyncio.to_thread(store.read, lambda c: c.execute(
                "SELECT count(*) FROM tokens WHERE origin = 'relay'").fetchone()[0])
        finally:
            await link.stop()
    finally:
        child.stdin.write(b"end\n")
        await child.wait()
        await access.stop()
        await asyncio.to_thread(store.close)
    worst, outside_gc = _lags(late, pauses)
    return {"seconds": done["acked"], "idle_lag_ms": _lags(idle, [])[0] * 1000,
            "longest_step_ms": _lags(steps, pauses)[1] * 1000,
            "worst_lag_ms": worst * 1000, "worst_lag_outside_gc_ms": outside_gc * 1000,
            "witness_lag_ms": _lags(witnessed, [])[0] * 1000,
            "lag_beyond_witness_ms": _beyond(late, witnessed) * 1000,
            "rss_growth_mib": grown, "tokens": float(min(stored, indexed)),
            "tracked_growth": float(tracked),
            "full_collections": float(len(pauses)),
            "worst_gc_ms": max((e - s for s, e in pauses), default=0.0) * 1000}


def report(count: int, result: dict[str, float]) -> str:
    return (f"tokens.sync of {count:,} tokens: acked after {result['seconds']:.1f} s; "
            f"event-loop lag during the sync {result['worst_lag_ms']:.1f} ms (goal <= 50; "
            f"{result['worst_lag_outside_gc_ms']:.1f} ms outside garbage collection, "
            f"{result['lag_beyond_witness_ms']:.1f} ms beyond an idle process's timer at the "
            f"same time, which was {result['witness_lag_ms']:.1f} ms late; before the sync "
            f"{result['idle_lag_ms']:.1f} ms); longest event-loop step "
            f"{result['longest_step_ms']:.1f} ms of CPU outside garbage collection; "
            f"{result['full_collections']:.0f} full collections (worst "
            f"{result['worst_gc_ms']:.1f} ms); objects tracked by the collector after the sync "
            f"{result['tracked_growth']:+,.0f}; peak RSS "
            f"+{result['rss_growth_mib']:.0f} MiB")


async def main(as_json: bool) -> None:
    logs.configure("console", "error" if as_json else "warning")
    with tempfile.TemporaryDirectory() as tmp:
        result = await measure(TOKENS, Path(tmp))
    print(json.dumps(result) if as_json else report(TOKENS, result))


def runs(n: int) -> None:
    """``n`` runs, each in a fresh process; min / median / max of each figure."""
    results = []
    for i in range(n):
        out = subprocess.run([sys.executable, "-m", "tests.bench.bench_relay_sync", "--json"],
                             check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[2]).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"run {i + 1}: {report(TOKENS, results[-1])}", flush=True)
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"{key:>26}: min {min(values):10.1f}  median {statistics.median(values):10.1f}"
              f"  max {max(values):10.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--relay"]:
        logs.configure("console", "error")
        asyncio.run(relay_process(int(sys.argv[2])))
    elif sys.argv[1:2] == ["--witness"]:
        asyncio.run(witness_process())
    elif sys.argv[1:2] == ["--runs"]:
        runs(int(sys.argv[2]))
    else:  # --json: the figures as one JSON object (for tests/integration/test_relay_link.py)
        asyncio.run(main("--json" in sys.argv[1:]))
