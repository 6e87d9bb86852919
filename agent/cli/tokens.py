"""``therelay-agent token …``: create, list, show, revoke, rotate, check."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from agent.access.model import (
    ADMIN_PROTOCOL,
    Protocol,
    Scope,
    ScopeLevel,
    Status,
    format_time,
    parse_duration,
    parse_protocols,
    parse_time,
)
from agent.access.policy import AccessRequest, Site, authorize
from agent.access.store import NewToken, TokenStore
from agent.access.tokens import Kind
from agent.cli.output import TOKEN_COLUMNS, emit_json, table, token_dict, token_rows
from agent.config import Config
from agent.errors import UsageError
from agent.links import allows_rtsp, rtsp_urls

T = TypeVar("T")


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _value(parse: Callable[[str], T], text: str, what: str) -> T:
    """Parse a command-line value; a bad one becomes an error naming the option."""
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", help="create, list, revoke, rotate and check tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")

    create = tsub.add_parser("create", parents=[common], help="create a token (shown once)")
    where = create.add_mutually_exclusive_group()
    where.add_argument("--camera", metavar="ID", help="scope: one camera")
    where.add_argument("--host", action="store_true", help="scope: every camera on this agent")
    where.add_argument("--account", action="store_true", help="scope: the whole account")
    create.add_argument("--protocol", default="", metavar="LIST",
                        help="allowed protocols, comma-separated: webrtc,rtsp,hls,snapshot "
                        "(default: all)")
    life = create.add_mutually_exclusive_group()
    life.add_argument("--ttl", metavar="DURATION", help="expires after 30m, 1h, 1d, 1w …")
    life.add_argument("--expires", metavar="TIME", help="expires at, e.g. 2026-12-01T00:00Z")
    create.add_argument("--label", default="", help="what the token is for (who holds it)")
    create.add_argument("--admin", action="store_true",
                        help="an admin token (trk_) for the admin API, host scope by default")
    create.set_defaults(handler=cmd_create)

    lst = tsub.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    lst.add_argument("--kind", choices=[k.value for k in Kind])
    lst.add_argument("--status", choices=[s.value for s in Status])
    lst.add_argument("--older-than", metavar="DURATION",
                     help="only tokens created longer ago than this, e.g. 90d (due to rotate)")
    lst.set_defaults(handler=cmd_list)

    show = tsub.add_parser("show", parents=[common], help="one token's details")
    show.add_argument("id")
    show.set_defaults(handler=cmd_show)

    revoke = tsub.add_parser("revoke", parents=[common], help="revoke a token at once")
    revoke.add_argument("id")
    revoke.set_defaults(handler=cmd_revoke)

    rotate = tsub.add_parser("rotate", parents=[common],
                             help="replace a token with a new one (same scope and lifetime)")
    rotate.add_argument("id")
    rotate.add_argument("--grace", metavar="DURATION",
                        help="keep the old token working this long (default: stops now)")
    rotate.set_defaults(handler=cmd_rotate)

    check = tsub.add_parser("check", parents=[common],
                            help="would this token be let in? prints the reason and the fix")
    check.add_argument("token", help="the token, or - to read it from standard input")
    check.add_argument("--camera", metavar="ID")
    check.add_argument("--protocol", default="webrtc",
                       choices=[*(p.value for p in Protocol), ADMIN_PROTOCOL],
                       help="the protocol of the request (default: webrtc)")
    check.add_argument("--ip", metavar="IP", help="the viewer's address (informational)")
    check.set_defaults(handler=cmd_check)


def _scope(args: argparse.Namespace, config: Config) -> Scope:
    if args.camera:
        return Scope(ScopeLevel.CAMERA, args.camera)
    if args.account:
        return Scope(ScopeLevel.ACCOUNT, config.agent.account_id)
    if args.host or args.admin:
        return Scope(ScopeLevel.HOST, config.agent.id)
    raise UsageError("choose the token's scope: --camera ID, --host or --account")


def cmd_create(args: argparse.Namespace, config: Config, store: TokenStore) -> int:
    now = time.time()
    protocols = _value(parse_protocols, args.protocol, "--protocol")
    ttl = _value(parse_duration, args.ttl, "--ttl") if args.ttl else None
    expires = _value(parse_time, args.expires, "--expires") if args.expires else None
    new = store.create(
        Kind.ADMIN if args.admin else Kind.ACCESS, _scope(args, config), now,
        protocols=protocols, expires_at=expires, ttl=ttl, label=args.label,
        created_by=actor(),
    )
    _print_new(args, config, new, now, "Created")
    return 0


def _print_new(args: argparse.Namespace, config: Config, new: NewToken, now: float,
               verb: str) -> None:
    if args.json:
        emit_json({**token_dict(new.record, now), "token": new.token})
        return
    r = token_dict(new.record, now)
    print(f"{verb} {r['kind']} token {r['id']}: scope {r['scope']}, protocols "
          f"{','.join(r['protocols'])}, expires {r['expires_at'] or 'never'}.")
    print("The token is shown this once; store it safely (it cannot be recovered):\n")
    print(f"  {new.token}\n")
    if new.record.kind is Kind.ACCESS and allows_rtsp(new.record):
        scope = new.record.scope
        camera = scope.value if scope.level is ScopeLevel.CAMERA else "<camera-id>"
        for url in rtsp_urls(config, camera, new.token):
            print(f"RTSP (VLC, ffmpeg, a VMS):\n  {url}\n")


def cmd_list(args: argparse.Namespace, _config: Config, store: TokenStore) -> int:
    now = time.time()
    records = store.list_tokens(
        now, kind=Kind(args.kind) if args.kind else None,
        status=Status(args.status) if args.status else None,
    )
    if args.older_than:
        cutoff = now - _value(parse_duration, args.older_than, "--older-than")
        records = [r for r in records if r.created_at < cutoff]
    if args.json:
        emit_json([token_dict(r, now) for r in records])
    elif records:
        print(table(token_rows(records, now), TOKEN_COLUMNS))
    else:
        print("No tokens. Create one with 'therelay-agent token create --camera ID'.")
    return 0


def cmd_show(args: argparse.Namespace, _config: Config, store: TokenStore) -> int:
    now = time.time()
    d = token_dict(store.get(args.id), now)
    if args.json:
        emit_json(d)
    else:
        d["protocols"] = ",".join(d["protocols"])
        width = max(len(k) for k in d)
        for key, value in d.items():
            print(f"{key.ljust(width)}  {'-' if value in (None, '') else value}")
    return 0


def cmd_revoke(args: argparse.Namespace, _config: Config, store: TokenStore) -> int:
    now = time.time()
    record = store.revoke(args.id, now, actor())
    if args.json:
        emit_json(token_dict(record, now))
    else:
        print(f"Revoked {record.display} at {format_time(record.revoked_at)}. "
              "A running agent ends its live sessions within a second.")
    return 0


def cmd_rotate(args: argparse.Namespace, config: Config, store: TokenStore) -> int:
    now = time.time()
    grace = _value(parse_duration, args.grace, "--grace") if args.grace else None
    new = store.rotate(args.id, now, actor(), grace=grace)
    if not args.json:
        old = "keeps working until " + format_time(now + grace) if grace else "stopped working"
        print(f"Rotated {args.id}: the old token {old}.")
    _print_new(args, config, new, now, "New")
    return 0


def cmd_check(args: argparse.Namespace, config: Config, store: TokenStore) -> int:
    text = sys.stdin.readline().strip() if args.token == "-" else args.token.strip()
    tokens, _ = store.load_all()
    req = AccessRequest(text, args.camera, args.protocol, args.ip, time.time())
    decision = authorize(req, tokens, Site(config.agent.id, config.agent.account_id))
    result = {
        "granted": decision.granted,
        "reason": decision.reason.value,
        "token_id": decision.token_id,
        "camera": args.camera,
        "protocol": args.protocol,
        "fix": decision.fix,
    }
    if args.json:
        emit_json(result)
    else:
        verdict = "granted" if decision.granted else f"denied: {decision.reason.value}"
        who = f" (token {decision.record.display})" if decision.record else ""
        print(f"{verdict}{who}")
        if not decision.granted:
            print(f"fix: {decision.fix}")
        if args.camera and args.camera not in config.camera_ids:
            print(f"note: camera {args.camera!r} is not configured on this agent: viewers "
                  "asking for it get 'not found' whatever the token")
    return 0 if decision.granted else 1
