"""Benchmark: how long ``therelay-agent token list`` takes from exec to exit, and what it
imports on the way.

Requirement behind it: a CLI command other than ``run`` does not import the daemon (aiohttp,
aiortc, PyAV) and ``token list`` finishes within 0.2 s on the 2-core test machine. Prints the
median and spread of several runs of the real command (a fresh interpreter each), then the
``python -X importtime`` tally of the same command: the slowest top-level imports and
whether any daemon module was loaded.
Run: ``.venv/bin/python -m tests.bench.bench_cli [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.2  # seconds, median of the runs
DAEMON_MODULES = ("aiohttp", "aiortc", "aioice", "av", "zeroconf", "zeep", "websockets")
ROOT = Path(__file__).resolve().parents[2]


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, *extra, "-m", "agent", "token", "list", "--config", str(config)]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONASYNCIODEBUG", None)  # measured as it runs in production
    env.pop("THERELAY_CONFIG", None)
    return env


def timed_runs(config: Path, runs: int) -> list[float]:
    env = environment()
    subprocess.run(command(config), env=env, check=True, capture_output=True)  # warm caches
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command(config), env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def import_times(config: Path) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, module) for every import of one ``token list``."""
    proc = subprocess.run(command(config, "-X", "importtime"), env=environment(), check=True,
                          capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        rows.append((int(own), int(cumulative), name.rstrip()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.yaml"
        config.write_text(f"state_dir: {Path(tmp) / 'state'}\n"
                          "cameras:\n  - id: cam1\n    source: testsrc://\n")
        times = timed_runs(config, args.runs)
        rows = import_times(config)
    median = statistics.median(times)
    print(f"token list, {args.runs} runs: median {median * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
          f"(target <= {TARGET * 1000:.0f} ms: {'met' if median <= TARGET else 'NOT met'})")
    total = sum(r[0] for r in rows)
    print(f"imports (python -X importtime): {len(rows)} modules, {total / 1000:.0f} ms in all")
    # What agent.cli pulls in, one level down (the importtime tree indents two spaces a level).
    depth = {name: (len(name) - len(name.lstrip(" ")) - 1) // 2 for _, _, name in rows}
    children = [r for r in rows if depth[r[2]] == 1]
    print("slowest imports directly under the top-level modules (cumulative):")
    for _, cumulative, name in sorted(children, reverse=True, key=lambda r: r[1])[:10]:
        print(f"  {cumulative / 1000:6.1f} ms  {name.strip()}")
    names = {r[2].strip() for r in rows}
    daemon = [m for m in DAEMON_MODULES if m in names]
    print(f"daemon modules imported: {', '.join(daemon) if daemon else 'none'}")


if __name__ == "__main__":
    main()
