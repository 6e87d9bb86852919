"""The suite's loop-blocking check (tests/conftest.py) is on and fails a test that blocks.

The proof runs a tiny test file with pytest in a subprocess under the project's own
configuration (pyproject.toml's pytest section and tests/conftest.py): a 0.3 s time.sleep
inside ``async def`` must fail it with the blocked-loop message, the same wait as an
``await asyncio.sleep`` must pass.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import SLOW_CALLBACK_SECONDS

ROOT = Path(__file__).resolve().parents[2]

PROBE = '''
import asyncio
import time


async def test_blocks_the_loop():
    time.sleep(0.3)


async def test_waits_without_blocking():
    await asyncio.sleep(0.3)


def test_blocks_a_loop_of_its_own():
    async def work():
        time.sleep(0.3)

    asyncio.run(work())
'''


async def _pytest(path: Path, tmp_path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
        "--rootdir", str(ROOT), "-p", "tests.conftest", "-p", "no:cacheprovider",
        "--basetemp", str(tmp_path / "basetemp"), "-q", "-rA", str(path),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return await proc.wait(), out.decode()


async def test_this_loop_runs_in_debug_mode_with_the_suites_threshold() -> None:
    loop = asyncio.get_running_loop()
    assert loop.get_debug()
    assert loop.slow_callback_duration == SLOW_CALLBACK_SECONDS


async def test_a_blocking_sleep_in_an_async_test_fails_it(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    code, out = await _pytest(probe, tmp_path)
    assert code == 1, out
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith(("ERROR", "FAILED"))]
    assert len(failed) == 2, out
    assert any("test_blocks_the_loop" in line and "the event loop was blocked" in line
               for line in failed), out
    assert any("test_blocks_a_loop_of_its_own" in line for line in failed), out
    assert not any("test_waits_without_blocking" in line for line in failed), out
    assert any(line.startswith("PASSED") and "test_waits_without_blocking" in line
               for line in lines), out
    assert "took 0.3" in out, out
