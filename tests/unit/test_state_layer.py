"""``agent/state/`` is the bottom layer: the table modules above it (TokenStore,
AdoptedCameras) import it, never the other way round (docs/development.md)."""

from __future__ import annotations

import ast
from pathlib import Path

STATE = Path(__file__).parents[2] / "agent" / "state"
#: Packages built on the state layer, and the daemon: none may be imported by it.
ABOVE = ("agent.access", "agent.discovery", "agent.relay", "agent.media", "agent.http",
         "agent.webrtc", "agent.rtsp", "agent.cli", "agent.app", "agent.stores")


def upward_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [n for n in names if n.startswith(ABOVE)]
    return found


def test_the_check_sees_an_upward_import() -> None:
    assert upward_imports("from agent.access.model import Scope\nimport agent.relay.link") == [
        "agent.access.model", "agent.relay.link"]
    assert upward_imports("from agent.state.db import connect\nfrom agent.errors import X") == []


def test_the_state_layer_imports_nothing_above_it() -> None:
    modules = sorted(STATE.glob("*.py"))
    assert {p.name for p in modules} >= {"db.py", "database.py", "outbox.py"}
    offenders = {p.name: up for p in modules if (up := upward_imports(p.read_text()))}
    assert offenders == {}
