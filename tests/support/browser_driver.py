"""Drive Debian's headless Chromium once: open a URL, wait for a condition, report a value.

Run inside a network namespace (see ``tests.support.browser.run_in_browser``)::

    python -m tests.support.browser_driver URL [--wait-for E] [--result R]
        [--timeout SECONDS] [--screenshot PATH] [--expose-host-ips]
        [--chromium-arg ARG ...] [--allow-host HOST ...] [--viewport WxH] [--keep-csp]

opens URL, waits until the JavaScript expression E is truthy (default: ``R !== undefined``),
evaluates R (default ``window.__result``), saves a screenshot to PATH and prints one JSON
object on stdout::

    {"ok": true, "result": <R>, "console": [...], "page_errors": [...], "timings": {...}}

On failure (navigation error, timeout, exception) it still saves the screenshot when it can,
prints ``{"ok": false, "error": "...", ...}`` and exits with status 1. E and R may be
expressions or function source (``() => ...``), as Playwright's ``evaluate`` accepts.

Uses ``/usr/bin/chromium`` (Debian package chromium); never ``playwright install``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"

# Flags from the field notes, plus what keeps every lookup and connection on this machine.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

# Chromium hides the IP of WebRTC host candidates behind a random mDNS name (<uuid>.local,
# feature WebRtcHideLocalIpsWithMdns) unless the page may capture camera or microphone.
# Granting that permission exposes the real addresses, as for a page that asked for a camera.
# (--disable-features=WebRtcHideLocalIpsWithMdns also works, but Chromium honours only the last
# --disable-features switch, so it would silently drop Playwright's own list.)
EXPOSE_HOST_IPS_PERMISSIONS = ["camera", "microphone"]


def host_resolver_rules(hosts: list[str]) -> str:
    """Resolve nothing, except the hosts the test serves from (IP literals included: Chromium
    applies ``MAP * ~NOTFOUND`` to them too, giving ERR_NAME_NOT_RESOLVED). One argv element,
    so no shell quotes around the rule."""
    rule = "MAP * ~NOTFOUND"
    for host in hosts:
        rule += f" , EXCLUDE {host}"
    return f"--host-resolver-rules={rule}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.browser_driver")
    parser.add_argument("url")
    parser.add_argument("--wait-for", default=None,
                        help="JS expression to wait for (default: RESULT !== undefined)")
    parser.add_argument("--result", default="window.__result",
                        help="JS expression whose value is printed as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for the wait")
    parser.add_argument("--screenshot", default=None, help="PNG path to write")
    parser.add_argument("--chromium-arg", action="append", default=[],
                        help="extra Chromium flag (repeatable)")
    parser.add_argument("--allow-host", action="append", default=[],
                        help="host Chromium may resolve besides the URL's (repeatable)")
    parser.add_argument("--expose-host-ips", action="store_true",
                        help="grant camera+microphone so WebRTC host candidates carry real IPs")
    parser.add_argument("--viewport", default=None, metavar="WxH",
                        help="page size in CSS pixels, e.g. 390x844 for a phone")
    parser.add_argument("--keep-csp", action="store_true",
                        help="enforce the page's Content-Security-Policy (its violations are "
                             "logged to the console)")
    parser.add_argument("--executable", default=CHROMIUM)
    args = parser.parse_args(argv)
    url_host = urlsplit(args.url).hostname
    allowed = [*([url_host] if url_host else []), *args.allow_host]
    wait_for = args.wait_for or f"() => ({args.result}) !== undefined"

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    report: dict[str, Any] = {"ok": False, "console": [], "page_errors": [], "timings": {}}
    timings: dict[str, float] = report["timings"]
    started = time.monotonic()

    def mark(name: str) -> None:
        timings[name] = round(time.monotonic() - started, 3)

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.executable,
            args=[*CHROMIUM_ARGS, host_resolver_rules(allowed), *args.chromium_arg],
            timeout=30_000,
        )
        mark("launched")
        try:
            # The agent's pages forbid eval (strict CSP); the test's own probes need it,
            # unless they are plain expressions (--keep-csp).
            options: dict[str, Any] = {"bypass_csp": not args.keep_csp}
            if args.viewport:
                width, _, height = args.viewport.partition("x")
                options["viewport"] = {"width": int(width), "height": int(height)}
            context = browser.new_context(**options)
            if args.expose_host_ips:
                context.grant_permissions(EXPOSE_HOST_IPS_PERMISSIONS)
            page = context.new_page()
            page.on("console", lambda m: report["console"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: report["page_errors"].append(str(e)))
            try:
                page.goto(args.url, timeout=args.timeout * 1000)
                mark("loaded")
                page.wait_for_function(wait_for, timeout=args.timeout * 1000)
                mark("condition")
                report["result"] = page.evaluate(args.result)
                report["ok"] = True
            except PlaywrightError as exc:
                report["error"] = f"{type(exc).__name__}: {exc}"
            if args.screenshot:
                try:
                    page.screenshot(path=args.screenshot, full_page=True, timeout=5000)
                    report["screenshot"] = args.screenshot
                except PlaywrightError as exc:
                    report["screenshot_error"] = str(exc)
        finally:
            browser.close()
    mark("closed")
    json.dump(report, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
