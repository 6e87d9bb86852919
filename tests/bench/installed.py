"""Run the agent in benchmarks as an installer has it, on every core the machine has.

The test venv (.venv after ./test.sh) also holds the test tools, and some of them change
what the agent loads: structlog imports rich (and with it pygments) and greenlet whenever
they are installed, about 4 MB of memory no installed agent has (docs/field-notes.md).
Benchmarks that report the agent's CPU or memory run it from ``build/bench-venv``, made by
the same ``scripts/setup-venv`` as ``./run.sh`` (the agent's dependencies only, at the
versions in constraints.txt; the agent itself installed from this checkout).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from tests.support.agent import AgentProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "build" / "bench-venv"
TEST_ONLY = ("rich", "pygments", "greenlet", "pytest")


def installed_python() -> str:
    """The interpreter of a venv set up like ``./run.sh`` does (created or brought up to
    date on first use: seconds when pip's cache holds the wheels)."""
    subprocess.run([str(ROOT / "scripts" / "setup-venv")], cwd=ROOT, check=True,
                   env={**os.environ, "VENV": str(VENV)})
    python = str(VENV / "bin" / "python")
    found = subprocess.run(
        [python, "-c", "import importlib.util as u, sys; "
         "print(*[m for m in sys.argv[1:] if u.find_spec(m)])", *TEST_ONLY],
        capture_output=True, text=True, check=True).stdout.split()
    if found:
        sys.exit(f"{VENV} holds test tools ({', '.join(found)}): remove it and run again")
    return python


def every_cpu() -> list[int]:
    """Let this process and its children (camera, agent, viewers) run on every online CPU.
    Some machines start every process pinned to one core: the harness would then compete
    with the agent for it, and its caches, in every window."""
    cpus = list(range(os.cpu_count() or 1))
    with contextlib.suppress(OSError):  # a cpuset narrower than the machine: keep ours
        os.sched_setaffinity(0, cpus)
    return sorted(os.sched_getaffinity(0))


def measure_as_installed() -> None:
    """Agents the benchmark starts run from the installer's venv; the harness on every
    core. Prints both."""
    AgentProcess.python = installed_python()
    print(f"agent: {AgentProcess.python} (no test tools); CPUs {every_cpu()}")
