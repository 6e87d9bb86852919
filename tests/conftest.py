"""Shared fixtures, and the session-wide record of every token the tests created.

Every token generated through the store is remembered (``ISSUED``); tests that read tokens
from a subprocess's output add them with ``remember``. ``tests/unit/test_zz_no_leaks.py``
runs last and greps every file the session wrote (databases, WAL files, daemon logs) for
each of them. Files that hold a token on purpose are named ``*.secret`` or lie in a
directory named ``creds``.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import agent.access.store as store_module
from agent import cli, logs
from agent.access.tokens import Kind, ParsedToken

# Every event loop in the tests runs in debug mode: a callback that blocks the loop for
# SLOW_CALLBACK_SECONDS or more is logged by asyncio, and the fixture below turns that into a
# test failure. pytest-asyncio's loops get debug from `asyncio_debug = true` (pyproject.toml;
# since pytest-asyncio 1.2 it overrides the environment variable), the threshold from the
# policy below; loops a test makes itself (asyncio.run) and the daemons the tests start (they
# inherit the environment) get debug mode from PYTHONASYNCIODEBUG.
#
# Why 0.25 s and not asyncio's default 0.1 s: asyncio measures wall-clock time, and on a
# loaded 2-core machine the scheduler alone stretches a 30 ms callback past 100 ms now and
# then; the blocking calls this check exists for (time.sleep, subprocess.run of ffprobe or
# gst, a synchronous HTTP request, waiting on a thread) take from a few hundred milliseconds
# to seconds, so 0.25 s catches them without failing tests for the machine's load.
SLOW_CALLBACK_SECONDS = 0.25
os.environ["PYTHONASYNCIODEBUG"] = "1"


class _CheckedLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new loop (pytest-asyncio's included) gets the suite's slow-callback threshold."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
        return loop


asyncio.set_event_loop_policy(_CheckedLoopPolicy())
# Network discipline: an agent started by a test in the host's namespace must not probe or
# announce on the host's real interfaces. Tests of discovery run the agent inside network
# namespaces they create and set these back to true there.
os.environ["THERELAY_DISCOVERY_ENABLED"] = "false"
os.environ["THERELAY_DISCOVERY_ADVERTISE"] = "false"

# The test process logs as the daemon does (agent/logs.py), not with structlog's defaults,
# whose console renderer pretty-prints an exception with its local variables (through rich,
# a test dependency): that takes a third of a second in the event loop, which the daemon
# never spends. Warnings and up, as Python's default: asyncio's debug mode says a lot at info.
logs.configure("json", "warning")

ISSUED: set[str] = set()
TOKEN_RE = re.compile(r"tr[apk]_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")
_real_generate = store_module.generate  # type: ignore[attr-defined]


def _recording_generate(kind: Kind, public_id: str | None = None) -> ParsedToken:
    parsed = _real_generate(kind, public_id)
    ISSUED.add(parsed.text)
    return parsed


store_module.generate = _recording_generate  # type: ignore[attr-defined]


def remember(text: str) -> list[str]:
    """Record every token that appears in ``text`` (e.g. a subprocess's stdout)."""
    found = TOKEN_RE.findall(text)
    ISSUED.update(found)
    return found


def write_secret(path: Path, text: str) -> Path:
    """A secret file as an installer must make it: mode 0600 (the agent refuses wider)."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The leak check needs every other test to have run first."""
    items.sort(key=lambda item: "test_zz_no_leaks" in item.nodeid)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep what the test modules imported (aiortc, PyAV, zeep, schemathesis, …: a large heap
    that lives for the whole session) out of the garbage collector, as the daemon does with
    zeep's WSDL graph (agent/app.py). A full collection of it took 0.25-0.6 s on a loaded
    machine: run by the interpreter inside any callback, it would fail that test."""
    gc.collect()
    gc.freeze()


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " took " in message:
            self.seen.append(message)


_slow = _SlowCallbacks()
logging.getLogger("asyncio").addHandler(_slow)


@pytest.fixture(autouse=True)
def _no_blocking_in_the_event_loop() -> Iterator[None]:
    """Fail a test during which anything blocked an event loop (asyncio debug mode)."""
    _slow.seen.clear()
    yield
    assert not _slow.seen, f"the event loop was blocked: {_slow.seen}"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def tokens(self) -> list[str]:
        return remember(self.out)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def run_cli(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """Run ``therelay-agent ARGS`` in-process with a private state dir; optional stdin."""
    for name in list(os.environ):
        if name.startswith("THERELAY_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("THERELAY_STATE_DIR", str(state_dir))
    monkeypatch.setenv("THERELAY_AGENT_ID", "site1")
    monkeypatch.setenv("THERELAY_AGENT_ACCOUNT_ID", "acme")

    def run(*args: str, stdin: str | None = None) -> CliResult:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
