"""``therelay-agent audit …`` and ``therelay-agent stats``: what tokens did, and how much."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from dataclasses import replace

from agent.access import audit, usage
from agent.access.audit import AuditQuery
from agent.access.model import Status, format_time, parse_duration, parse_time
from agent.access.store import TokenStore
from agent.cli.output import emit_json, table
from agent.config import Config
from agent.errors import UsageError
from agent.stores import State


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    aud = sub.add_parser("audit", parents=[common],
                         help="read, export or verify the audit log (tamper-evident)")
    aud.add_argument("action", nargs="?", choices=["verify"],
                     help="'verify' checks the hash chain; without it, entries are listed")
    aud.add_argument("--token", metavar="ID", help="only this token's entries")
    aud.add_argument("--camera", metavar="ID")
    aud.add_argument("--event", help="e.g. access.denied, token.revoked")
    aud.add_argument("--result", choices=["granted", "denied"])
    aud.add_argument("--reason", help="e.g. revoked, expired, scope_mismatch")
    aud.add_argument("--ip", metavar="IP")
    aud.add_argument("--since", metavar="WHEN", help="a time (2026-12-01T00:00Z) or an age (1h)")
    aud.add_argument("--until", metavar="WHEN")
    aud.add_argument("--limit", type=int, default=50, help="entries to show (default 50)")
    aud.add_argument("--export", choices=["jsonl"],
                     help="write every matching entry, with its hashes, to standard output")
    aud.set_defaults(handler=cmd_audit)

    stats = sub.add_parser("stats", parents=[common],
                           help="usage per token: last used, uses per day, protocols, IPs")
    stats.add_argument("id", nargs="?", help="one token in detail (default: all tokens)")
    stats.add_argument("--unused", metavar="DURATION",
                       help="only active tokens not used for this long, e.g. 30d")
    stats.set_defaults(handler=cmd_stats)


def _when(text: str | None, now: float, option: str) -> float | None:
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is neither a time like 2026-12-01T00:00Z "
                         "nor an age like 1h") from None


def cmd_audit(args: argparse.Namespace, _config: Config, state: State) -> int:
    store = state.tokens
    if args.action == "verify":
        return _verify(args, store)
    now = time.time()
    q = AuditQuery(
        token_id=args.token, camera=args.camera, event=args.event, result=args.result,
        reason=args.reason, peer_ip=args.ip, since=_when(args.since, now, "--since"),
        until=_when(args.until, now, "--until"), limit=max(1, args.limit),
    )
    if args.export:
        def export(conn: sqlite3.Connection) -> None:
            for entry in audit.iter_all(conn, q):
                sys.stdout.write(json.dumps(entry, sort_keys=True) + "\n")
        store.read(export)
        return 0
    total = store.read(lambda c: int(c.execute("SELECT count(*) FROM audit").fetchone()[0]))
    entries = store.read(lambda c: audit.query(c, replace(q, newest_first=True)))[::-1]
    if args.json:
        emit_json(entries)
        return 0
    if not entries:
        print("No matching audit entries." if total else "The audit log is empty.")
        return 0
    rows = [[e["seq"], format_time(e["ts"]), e["event"], e["token_id"], e["camera"],
             e["protocol"], e["peer_ip"], e["reason"] or e["result"], e["actor"]]
            for e in entries]
    print(table(rows, ["seq", "time", "event", "token", "camera", "protocol", "ip",
                       "reason", "actor"]))
    return 0


def _verify(args: argparse.Namespace, store: TokenStore) -> int:
    result = store.read(audit.verify)
    if args.json:
        emit_json({"ok": result.ok, "checked": result.checked, "head_seq": result.head_seq,
                   "head_hash": result.head_hash, "problem": result.problem})
    elif result.ok:
        print(f"audit log intact: {result.checked} entries verified; "
              f"head {result.head_seq} {result.head_hash}")
        print("Keep the head hash elsewhere to detect a later truncation of the newest entries.")
    else:
        print(f"AUDIT LOG TAMPERED: {result.problem} "
              f"({result.checked} entries verified before it)")
    return 0 if result.ok else 1


def cmd_stats(args: argparse.Namespace, _config: Config, state: State) -> int:
    store = state.tokens
    now = time.time()
    if args.id:
        record = store.get(args.id)
        data = store.read(lambda c: usage.stats(c, record.id))
        if args.json:
            emit_json(data)
            return 0
        print(f"token {record.display}  last used {format_time(data['last_used_at'])}  "
              f"uses {data['uses']}  denied {data['denied']}")
        if data["per_day"]:
            print("\nper day:")
            print(table([[format_time(d["day"] * 86400)[:10], d["granted"], d["denied"]]
                         for d in data["per_day"]], ["day", "granted", "denied"]))
        if data["per_protocol"]:
            print("\nper protocol:")
            print(table([[p, v["granted"], v["denied"]] for p, v in data["per_protocol"].items()],
                        ["protocol", "granted", "denied"]))
        if data["ips"]:
            print("\naddresses:")
            print(table([[i["ip"], i["count"], format_time(i["last_seen"])] for i in data["ips"]],
                        ["ip", "count", "last seen"]))
        return 0
    unused_before = _when(args.unused, now, "--unused") if args.unused else None
    rows = []
    for record in store.list_tokens(now):
        if unused_before is not None and (
            record.status(now) is not Status.ACTIVE
            or (record.last_used_at or record.created_at) > unused_before
        ):
            continue
        data = store.read(lambda c, rid=record.id: usage.stats(c, rid))  # type: ignore[misc]
        rows.append({"id": record.id, "display": record.display,
                     "status": record.status(now).value,
                     "last_used_at": data["last_used_at"], "uses": data["uses"],
                     "denied": data["denied"], "ips": len(data["ips"]),
                     "protocols": sorted(data["per_protocol"])})
    if args.json:
        emit_json(rows)
    elif rows:
        print(table([[r["id"], r["status"], format_time(r["last_used_at"]), r["uses"],
                      r["denied"], r["ips"], ",".join(r["protocols"]) or "-"] for r in rows],
                    ["token", "status", "last used", "uses", "denied", "ips", "protocols"]))
    else:
        print("No tokens match.")
    return 0
