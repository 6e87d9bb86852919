"""Run headless Chromium inside the viewer namespace of a ``NetnsPair``.

``run_in_browser(pair, url, result="window.__result", screenshot=path)`` starts
``ip netns exec <viewer_ns> .venv/bin/python -m tests.support.browser_driver ...``, waits for
it and returns the parsed report; it raises ``BrowserFailed`` (with the browser's console
and page errors in the message) when the page did not get there in time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import NetnsPair

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


class BrowserFailed(AssertionError):
    """The page did not reach the awaited condition, or the browser failed."""


@dataclass
class BrowserReport:
    result: Any
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    screenshot: Path | None = None


def chromium_available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def artifact_path(*parts: str) -> Path:
    """A path under ``test-artifacts/`` (git-ignored), with its directory created."""
    path = ARTIFACTS.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_in_browser(
    pair: NetnsPair,
    url: str,
    result: str = "window.__result",
    screenshot: Path | str | None = None,
    timeout: float = 10.0,
    *,
    wait_for: str | None = None,
    expose_host_ips: bool = False,
    chromium_args: Sequence[str] = (),
    viewport: tuple[int, int] | None = None,
    keep_csp: bool = False,
) -> BrowserReport:
    """Open ``url`` in Chromium in the viewer namespace and return the JSON value of ``result``.

    Waits until ``wait_for`` (a JS expression or function source; default ``result !==
    undefined``) is truthy, at most ``timeout`` seconds after the page loaded. Chromium names
    its WebRTC host candidates ``<uuid>.local`` (mDNS) like a real browser does, unless
    ``expose_host_ips`` grants the page camera/microphone permission. ``viewport`` is the
    page size in CSS pixels (Playwright's default is 1280x720). ``keep_csp`` enforces the
    page's Content-Security-Policy (by default Playwright bypasses it for the probes);
    violations then appear in ``console``.
    """
    argv = [sys.executable, "-m", "tests.support.browser_driver", url,
            "--result", result, "--timeout", str(timeout)]
    if wait_for is not None:
        argv += ["--wait-for", wait_for]
    if screenshot is not None:
        argv += ["--screenshot", str(screenshot)]
    if expose_host_ips:
        argv.append("--expose-host-ips")
    if viewport is not None:
        argv += ["--viewport", f"{viewport[0]}x{viewport[1]}"]
    if keep_csp:
        argv.append("--keep-csp")
    for arg in chromium_args:
        argv.append(f"--chromium-arg={arg}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    try:
        done = pair.run(pair.viewer_ns, argv, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout + 40)
    except subprocess.TimeoutExpired as exc:
        raise BrowserFailed(f"browser driver hung: {exc}") from exc
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BrowserFailed(
            f"browser driver exited {done.returncode} without a report\n"
            f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}"
        ) from exc
    if not report.get("ok"):
        raise BrowserFailed(
            f"{report.get('error')}\nconsole: {report.get('console')}\n"
            f"page errors: {report.get('page_errors')}\ntimings: {report.get('timings')}\n"
            f"stderr: {done.stderr[-2000:]}"
        )
    shot = report.get("screenshot")
    return BrowserReport(
        result=report.get("result"),
        console=report.get("console", []),
        page_errors=report.get("page_errors", []),
        timings=report.get("timings", {}),
        screenshot=Path(shot) if shot else None,
    )
