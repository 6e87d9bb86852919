"""The dead-code check that ./test.sh runs (vulture, configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["vulture"]


def vulture(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vulture", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_agent_has_no_dead_code() -> None:
    result = vulture()  # the settings in pyproject.toml, as ./test.sh runs it
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_reports_an_unused_function_class_and_constant(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "LIMIT = 3\n"
        "UNUSED_LIMIT = 4\n\n"
        "class Unused(Exception):\n    pass\n\n"
        "def used() -> int:\n    return LIMIT\n\n"
        "def unused() -> int:\n    return 2\n\n"
        "print(used())\n")
    result = vulture(str(module), "--min-confidence", str(SETTINGS["min_confidence"]),
                     cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr  # 3: dead code found
    reported = result.stdout
    for name in ("UNUSED_LIMIT", "Unused", "unused"):
        assert f"'{name}'" in reported
    assert "'used'" not in reported and "'LIMIT'" not in reported
