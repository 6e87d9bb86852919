"""scripts/setup-venv: installs at the versions in constraints.txt, again only when
pyproject.toml or constraints.txt changed, and a test install serves ./run.sh too.

The script runs on a copy of the three files it reads, with a stand-in pip that records how
it was called (the real install is what ./test.sh does on every run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PIP = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../pip-calls"
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "setup-venv", tmp_path / "scripts" / "setup-venv")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    (bin_dir / "pip").write_text(PIP)
    (bin_dir / "pip").chmod(0o755)
    return tmp_path


def setup_venv(tree: Path, *args: str) -> list[str]:
    """Run the script; the package installs pip was asked for (not its self-upgrade)."""
    calls = tree / ".venv" / "pip-calls"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "PYTHON")}
    done = subprocess.run([tree / "scripts" / "setup-venv", *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    if not calls.exists():
        return []
    return [line for line in calls.read_text().splitlines() if "--upgrade pip" not in line]


def test_constraints_pin_every_install(tree: Path) -> None:
    assert setup_venv(tree, "--test") == [
        "install --disable-pip-version-check -c constraints.txt -e .[test]"]
    assert setup_venv(tree) == []  # ./run.sh after ./test.sh: nothing to install
    assert setup_venv(tree, "--test") == []


def test_a_plain_install_is_not_enough_for_the_tests(tree: Path) -> None:
    assert setup_venv(tree) == ["install --disable-pip-version-check -c constraints.txt -e ."]
    assert setup_venv(tree) == []
    assert setup_venv(tree, "--test") == [
        "install --disable-pip-version-check -c constraints.txt -e .[test]"]


@pytest.mark.parametrize("changed", ["constraints.txt", "pyproject.toml"])
def test_a_changed_input_installs_again(tree: Path, changed: str) -> None:
    setup_venv(tree, "--test")
    with (tree / changed).open("a") as f:
        f.write("\n# changed\n")
    assert setup_venv(tree) == ["install --disable-pip-version-check -c constraints.txt -e ."]
    assert len(setup_venv(tree, "--test")) == 1
    assert setup_venv(tree, "--test") == []


def test_constraints_name_every_installed_package_exactly() -> None:
    """constraints.txt pins what the working venv holds (scripts/update-constraints)."""
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines and all("==" in line for line in lines), lines
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    for package in ("aiortc", "aioice", "av", "aiohttp", "zeroconf", "pytest", "pytest-asyncio"):
        assert package in pinned, f"constraints.txt does not pin {package}"
