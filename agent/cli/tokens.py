"""``therelay-agent token …``: create, list, show, update, revoke, rotate, check."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.access.model import (
    ADMIN_PROTOCOL,
    LISTING_PROTOCOL,
    MAX_LABEL,
    MAX_SESSIONS_CAP,
    SESSION_PROTOCOLS,
    Protocol,
    Scope,
    ScopeLevel,
    Status,
    TokenRecord,
    format_time,
    parse_duration,
    parse_max_sessions,
    parse_protocols,
    parse_time,
)
from agent.access.policy import AccessRequest, Reason, Site, authorize
from agent.access.store import KEEP, NewToken, TokenChange, TokenStore, editable_fields
from agent.access.tokens import Kind
from agent.cli.output import TOKEN_COLUMNS, emit_json, table, token_dict, token_rows
from agent.config import Config
from agent.errors import TokenError, UsageError
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


class _ScopeChange(argparse.Action):
    """Remembers which scope option ``token update`` was given (to refuse it clearly)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [option_string])


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
    create.add_argument("--max-sessions", metavar="N", help=MAX_SESSIONS_HELP)
    create.set_defaults(handler=cmd_create)

    update = tsub.add_parser(
        "update", parents=[common],
        help="change a token's label, expiry, protocols or session cap (not its scope)")
    update.add_argument("id")
    update.add_argument("--label", help="what the token is for (who holds it)")
    life = update.add_mutually_exclusive_group()
    life.add_argument("--ttl", metavar="DURATION", help="expires this long from now: 30m, 1d …")
    life.add_argument("--expires", metavar="TIME", help="expires at, e.g. 2026-12-01T00:00Z")
    life.add_argument("--no-expiry", action="store_true", help="never expires")
    update.add_argument("--protocol", metavar="LIST",
                        help="allowed protocols, comma-separated (webrtc,rtsp,hls,snapshot), "
                        "or 'all'")
    update.add_argument("--max-sessions", metavar="N", help=MAX_SESSIONS_HELP)
    for flag in ("--camera", "--host", "--account", "--scope", "--admin"):
        # Accepted only to say why not: a wider or narrower scope is another token.
        update.add_argument(flag, dest="scope_change", action=_ScopeChange, nargs="?",
                            help=argparse.SUPPRESS)
    update.set_defaults(handler=cmd_update)

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

    check = tsub.add_parser(
        "check", parents=[common],
        help="what is this token, and is it valid? with --camera: would this request be let "
        "in? prints the reason and the fix")
    check.add_argument("token", help="the token, or - to read it from standard input")
    check.add_argument("--camera", metavar="ID")
    check.add_argument("--protocol", default=None,
                       choices=[*(p.value for p in Protocol), ADMIN_PROTOCOL],
                       help="the protocol of the request (default with --camera: webrtc; "
                       "without: any the token allows)")
    check.add_argument("--ip", metavar="IP", help="the viewer's address (informational)")
    check.set_defaults(handler=cmd_check)


MAX_SESSIONS_HELP = (f"at most N live sessions at once (WebRTC, RTSP, HLS together), 1 to "
                     f"{MAX_SESSIONS_CAP}, or 'unlimited' (the default)")


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
    cap = (_value(parse_max_sessions, args.max_sessions, "--max-sessions")
           if args.max_sessions is not None else None)
    new = store.create(
        Kind.ADMIN if args.admin else Kind.ACCESS, _scope(args, config), now,
        protocols=protocols, expires_at=expires, ttl=ttl, label=args.label,
        created_by=actor(), max_sessions=cap,
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


def cmd_update(args: argparse.Namespace, _config: Config, store: TokenStore) -> int:
    if args.scope_change:
        raise UsageError(f"{args.scope_change[0]}: a token's scope cannot be changed; create a "
                         "new token with the scope you need ('token create'), then revoke "
                         "this one, or rotate it to replace its secret")
    now = time.time()
    change = TokenChange(
        label=args.label if args.label is not None else KEEP,
        ttl=_value(parse_duration, args.ttl, "--ttl") if args.ttl else KEEP,
        expires_at=(None if args.no_expiry else
                    _value(parse_time, args.expires, "--expires") if args.expires else KEEP),
        protocols=(KEEP if args.protocol is None
                   else frozenset() if args.protocol.strip().lower() == "all"
                   else _value(parse_protocols, args.protocol, "--protocol")),
        max_sessions=(KEEP if args.max_sessions is None
                      else _value(parse_max_sessions, args.max_sessions, "--max-sessions")),
    )
    if change.empty():
        raise UsageError("nothing to change: give --label, --ttl, --expires, --no-expiry, "
                         "--protocol or --max-sessions")
    if isinstance(change.label, str) and len(change.label) > MAX_LABEL:
        raise UsageError(f"--label: at most {MAX_LABEL} characters")
    try:
        before = store.get(args.id)
        record = store.update(args.id, now, actor(), change)
    except TokenError as exc:  # unknown, revoked, relay-issued…: nothing was changed
        raise UsageError(str(exc)) from None
    if args.json:
        emit_json(token_dict(record, now))
        return 0
    old, new = editable_fields(before), editable_fields(record)
    changed = [k for k in old if old[k] != new[k]]
    if not changed:
        print(f"Token {record.display} already has these values: nothing changed.")
        return 0
    print(f"Updated {record.display}:")
    for key in changed:
        if key != "ttl_seconds":  # shown through expires_at
            print(f"  {key}: {_shown(key, old[key])} -> {_shown(key, new[key])}")
    print("A running agent applies the change to live sessions within a second.")
    return 0


def _shown(key: str, value: Any) -> str:
    if key == "expires_at":
        return format_time(value) if value else "never"
    if key == "protocols":
        return ",".join(value)
    if key == "max_sessions":
        return "unlimited" if value is None else str(value)
    return repr(value)


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
    """With ``--camera``: would this request be let in? Without: what is this token, and
    is it valid? Either way the reason, the fix, and the token id whenever it can be read."""
    text = sys.stdin.readline().strip() if args.token == "-" else args.token.strip()
    tokens, _ = store.load_all()
    live = store.live_sessions()
    now = time.time()
    protocol = args.protocol or (Protocol.WEBRTC.value if args.camera else None)
    if args.camera:
        asked = protocol
    else:  # any camera: the token itself, whatever its scope
        asked = ADMIN_PROTOCOL if text.startswith("trk_") else LISTING_PROTOCOL
    req = AccessRequest(text, args.camera, asked or LISTING_PROTOCOL, args.ip, now)
    decision = authorize(req, tokens, Site(config.agent.id, config.agent.account_id))
    record = decision.record
    if decision.granted and record is not None:
        if (not args.camera and protocol and protocol != ADMIN_PROTOCOL and record.protocols
                and protocol not in record.protocols):
            decision = decision._replace(reason=Reason.PROTOCOL_NOT_ALLOWED)
        elif (args.camera and protocol in SESSION_PROTOCOLS and record.max_sessions is not None
              and live.get(record.id, 0) >= record.max_sessions):
            decision = decision._replace(reason=Reason.SESSION_LIMIT)
    about = _describe_token(record, now, live) if record is not None else None
    if args.json:
        emit_json({"granted": decision.granted, "reason": decision.reason.value,
                   "token_id": decision.token_id, "camera": args.camera, "protocol": protocol,
                   "fix": decision.fix, **({"token": about} if about else {})})
        return 0 if decision.granted else 1
    verdict = "granted" if decision.granted and args.camera else (
        "valid" if decision.granted else f"denied: {decision.reason.value}")
    who = (f" (token {record.display})" if record is not None
           else f" (token id {decision.token_id})" if decision.token_id else "")
    print(f"{verdict}{who}")
    if about is not None and not args.camera:
        print("\n".join(_token_lines(about)))
        if (decision.granted and record is not None and record.max_sessions is not None
                and live.get(record.id, 0) >= record.max_sessions):
            print("note: the token holds its max_sessions now: a new live session is refused "
                  "(session_limit) until one ends")
    if not decision.granted:
        print(f"fix: {decision.fix}")
    if args.camera and args.camera not in config.camera_ids:
        print(f"note: camera {args.camera!r} is not configured on this agent: viewers "
              "asking for it get 'not found' whatever the token")
    return 0 if decision.granted else 1


def _describe_token(record: TokenRecord, now: float, live: dict[str, int]) -> dict[str, Any]:
    """What ``token check`` says a token is (never its secret)."""
    status = record.status(now)
    return {
        "kind": record.kind.value,
        "scope": str(record.scope),
        "protocols": sorted(record.protocols) or ["all"],
        "expires_at": format_time(record.expires_at) if record.expires_at else None,
        "max_sessions": record.max_sessions,
        "live_sessions": live.get(record.id, 0),
        "status": "valid" if status is Status.ACTIVE else status.value,
    }


def _token_lines(about: dict[str, Any]) -> list[str]:
    cap = about["max_sessions"]
    sessions = f"{about['live_sessions']} live, " + ("unlimited" if cap is None
                                                     else f"at most {cap}")
    rows = [("kind", about["kind"]), ("scope", about["scope"]),
            ("protocols", ",".join(about["protocols"])),
            ("expires", about["expires_at"] or "never"),
            ("sessions", sessions if about["kind"] == Kind.ACCESS.value else "-"),
            ("status", about["status"])]
    return [f"  {key + ':':<11}{value}" for key, value in rows]
