"""How the CLI prints: aligned tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from agent.access.model import TokenRecord, format_time


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def token_dict(record: TokenRecord, now: float) -> dict[str, Any]:
    """A record as shown to people and programs: never the secret, never its hash."""
    return {
        "id": record.id,
        "display": record.display,
        "kind": record.kind.value,
        "scope": str(record.scope),
        "protocols": sorted(record.protocols) or ["all"],
        "permission": record.permission.value if record.permission else None,
        "status": record.status(now).value,
        "created_at": format_time(record.created_at),
        "created_by": record.created_by or None,
        "expires_at": format_time(record.expires_at) if record.expires_at else None,
        "label": record.label,
        "origin": record.origin.value,
        "revoked_at": format_time(record.revoked_at) if record.revoked_at else None,
        "replaced_by": record.replaced_by,
        "replaces": record.replaces,
        "last_used_at": format_time(record.last_used_at) if record.last_used_at else None,
    }


TOKEN_COLUMNS = ("id", "kind", "scope", "protocols", "status", "created_at", "expires_at",
                 "last_used_at", "label")


def token_rows(records: Sequence[TokenRecord], now: float) -> list[list[Any]]:
    out = []
    for r in records:
        d = token_dict(r, now)
        d["protocols"] = ",".join(d["protocols"])
        out.append([d[c] for c in TOKEN_COLUMNS])
    return out
