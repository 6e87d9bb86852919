"""``therelay-agent doctor``: check the setup, one line per check, with the fix for each."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent import logs
from agent.cli.output import emit_json
from agent.doctor import DEFAULT_TIMEOUT, Report, Status, diagnose

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2  # as agent.cli: nothing failed / a check failed /
# the command could not run (usage, configuration)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    doctor = sub.add_parser(
        "doctor", parents=[common],
        help="check config, state, cameras, relay and network, with the fix for each problem")
    doctor.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds per network step (default {DEFAULT_TIMEOUT:g})")
    doctor.set_defaults(handler=None)


def exit_status(report: Report) -> int:
    if report.config_error:
        return EXIT_ERROR
    return EXIT_FAILED if report.failed else EXIT_OK


def render(report: Report) -> str:
    """The readable report: a heading per group, one line per check, fixes indented."""
    width = max((len(r.name) for r in report.results), default=8)
    lines = [f"therelay-agent doctor: config {report.config}"]
    for group, results in report.groups():
        lines.append("")
        lines.append(group)
        for r in results:
            lines.append(f"  {r.status.value:<5} {r.name:<{width}}  {r.finding}")
            if r.fix and r.status in (Status.WARN, Status.FAIL):
                lines.append(f"  {'':<5} {'':<{width}}  fix: {r.fix}")
    counts = report.counts()
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + (
        ": a check failed" if report.failed else ": nothing failed"))
    return "\n".join(lines)


def main(args: argparse.Namespace, config_path: Path | None) -> int:
    """Run doctor for the ``doctor`` subcommand (config errors are part of the report)."""
    logs.configure("console", "error")
    if not 0 < args.timeout <= 300:
        print("error: --timeout: give seconds between 0 and 300", file=sys.stderr)
        return EXIT_ERROR
    report = asyncio.run(diagnose(config_path, args.timeout))
    code = exit_status(report)
    if args.json:
        emit_json({"ok": not report.failed, "exit_status": code, "config": report.config,
                   "counts": report.counts(),
                   "checks": [r.as_dict() for r in report.results]})
    else:
        print(render(report))
    return code
