"""CLI commands other than ``run`` start without importing the daemon.

The daemon's media and HTTP stack (aiohttp, aiortc, aioice, PyAV) takes most of a second to
import on a small machine; ``therelay-agent token list`` must not pay for it. Each check runs
in a fresh interpreter, since this test process has long since imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import remember

HEAVY = ("aiohttp", "aiortc", "aioice", "av", "zeroconf", "zeep", "websockets")

# Runs the given CLI commands in one fresh interpreter, then prints which heavy modules
# they loaded. argv[1] is a JSON list of argument lists.
PROBE = """
import json, sys
import agent.cli
for argv in json.loads(sys.argv[1]):
    code = agent.cli.main(argv)
    if code != 0:
        raise SystemExit(f"{argv} exited {code}")
heavy = json.loads(sys.argv[2])
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded_after(commands: list[list[str]], tmp_path: Path, *, first: str = "") -> list[str]:
    """The heavy modules loaded after ``first`` (Python code) and ``commands``, in a fresh
    interpreter with this tree first on the path."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("THERELAY_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", first + PROBE, json.dumps(commands), json.dumps(HEAVY)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    remember(proc.stdout)  # the leak check looks for any token created here
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.splitlines()[-1]))


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n"
                    "cameras:\n  - id: cam1\n    source: testsrc://\n")
    return str(path)


def test_import_of_the_cli_loads_no_daemon_module(tmp_path: Path) -> None:
    assert loaded_after([], tmp_path) == []


def test_token_commands_load_no_daemon_module(tmp_path: Path, config: str) -> None:
    c = ["--config", config]
    commands = [
        ["token", "create", "--camera", "cam1", "--label", "probe", *c],
        ["token", "list", *c],
        ["token", "list", "--json", *c],
        ["audit", *c],
        ["stats", *c],
        ["cameras", "list", *c],
    ]
    assert loaded_after(commands, tmp_path) == []


def test_the_probe_sees_a_daemon_import(tmp_path: Path) -> None:
    """The checks here can fail: importing the composition root is seen as loading aiohttp,
    and importing a WebRTC session as loading aiortc, aioice and PyAV."""
    assert "aiohttp" in loaded_after([], tmp_path, first="import agent.app\n")
    loaded = loaded_after([], tmp_path, first="import agent.webrtc.session\n")
    assert {"aiortc", "aioice", "av"} <= set(loaded)


def test_the_daemon_loads_webrtc_pyav_and_onvif_on_demand(tmp_path: Path) -> None:
    """The daemon's modules leave the WebRTC stack, PyAV and the ONVIF client to the first
    viewer, pull or camera query (agent/webrtc/stack.py): an idle agent does without them."""
    loaded = loaded_after([], tmp_path, first="import agent.app\n")
    assert not {"aiortc", "aioice", "av", "zeep"} & set(loaded), loaded
