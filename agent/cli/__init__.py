"""The ``therelay-agent`` command: run the daemon and manage tokens, audit and statistics.

Every subcommand prints a table for people and accepts ``--json`` for programs. Token
commands work whether or not the daemon runs; the daemon sees their changes within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import agent
from agent import logs, stores
from agent.access.db import db_path, explain
from agent.cli import audit as audit_cli
from agent.cli import cameras as cameras_cli
from agent.cli import doctor as doctor_cli
from agent.cli import tokens as token_cli
from agent.cli.output import emit_json, table
from agent.config import DEFAULT_CONFIG_PATH, Config, load, publisher_token, read_secret
from agent.errors import AgentError, ConfigError, UsageError

EXIT_FAILED = 1  # the command ran and the answer is no (denied, refused, tampered)
EXIT_ERROR = 2  # the command could not run as given (usage, configuration)


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked for (see agent.__init__)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"therelay-agent {agent.__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="PATH",
                        help=f"config file (default: $THERELAY_CONFIG, else {DEFAULT_CONFIG_PATH} "
                        "if it exists, else the embedded defaults)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="therelay-agent",
        description="TheRelay Agent: your cameras, anywhere, instantly.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the program's version number and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the agent (the daemon)")
    run.set_defaults(handler=None)

    cfg = sub.add_parser("config", help="check the configuration")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = csub.add_parser("check", parents=[common],
                            help="validate the config and show what the agent would use")
    check.set_defaults(handler=None)

    token_cli.add_parsers(sub, common)
    audit_cli.add_parsers(sub, common)
    doctor_cli.add_parsers(sub, common)
    cameras_cli.add_parsers(sub, common)
    return parser


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    if os.environ.get("THERELAY_CONFIG"):
        return None  # config.load reads $THERELAY_CONFIG; it wins over the default path
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None  # $THERELAY_CONFIG, else embedded defaults (decided in config.load)


def _check_secrets(config: Config) -> None:
    """Every secret and interface the config names can be read now, not at the first viewer."""
    from agent.webrtc.ice import host_addresses, rtc_configuration  # noqa: PLC0415 (aiortc is slow to import)

    for camera in config.cameras:
        if camera.username and read_secret(f"camera-{camera.id}", camera.password_file) is None:
            raise ConfigError(f"cameras: {camera.id!r} has a username but no password: set "
                              f"password_file or load the systemd credential camera-{camera.id}")
    host_addresses(config.webrtc)
    rtc_configuration(config.webrtc)


def _config_check(args: argparse.Namespace, config: Config) -> int:
    token = publisher_token(config)
    _check_secrets(config)
    cameras = [{"id": c.id, "name": c.name, "source": logs.redact_text(c.source)}
               for c in config.cameras]
    summary: dict[str, object] = {
        "config": config.origin,
        "agent_id": config.agent.id,
        "account_id": config.agent.account_id,
        "state_dir": str(config.state_dir),
        "http_listen": config.http.listen,
        "cameras": cameras,
        "tokens_max_active": config.tokens.max_active,
        "relay_url": config.relay.url,
        "publisher_token": "present, valid format" if token else "not configured",
    }
    if args.json:
        emit_json({"ok": True, **summary})
        return 0
    print(f"config OK ({config.origin})")
    for key, value in summary.items():
        if key != "cameras":
            print(f"  {key}: {value}")
    if cameras:
        print("  cameras:")
        print("    " + table([[c["id"], c["name"] or "-", c["source"]] for c in cameras],
                             ["id", "name", "source"]).replace("\n", "\n    "))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":  # an invalid config is one of doctor's findings
        return doctor_cli.main(args, _config_path(args))
    try:
        config = load(_config_path(args))
    except AgentError as exc:
        logs.configure("console", "warning")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    logs.configure(config.log.format, config.log.level if args.command == "run" else "warning")
    try:
        if args.command == "run":
            from agent import app  # noqa: PLC0415 (only `run` needs the daemon: aiohttp, aiortc, av)

            quick = config.origin == "embedded defaults"
            return asyncio.run(app.run(config, quick_start=quick))
        if args.command == "config":
            return _config_check(args, config)
        store = stores.open_store(config)
        try:
            return int(args.handler(args, config, store))
        finally:
            store.close()
    except (ConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `therelay-agent audit --export jsonl | head`
        return 0
    except sqlite3.Error as exc:  # a read outside a transaction: still one line, no traceback
        print(f"error: {explain(exc, db_path(config.state_dir))}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # a full or read-only disk under a file the command writes
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
