"""How the CLI prints: aligned tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from agent.access.model import TokenRecord, public_view

token_dict = public_view  # the CLI's name for it


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


TOKEN_COLUMNS = ("id", "kind", "scope", "protocols", "status", "created_at", "expires_at",
                 "last_used_at", "label")


def token_rows(records: Sequence[TokenRecord], now: float) -> list[list[Any]]:
    out = []
    for r in records:
        d = token_dict(r, now)
        d["protocols"] = ",".join(d["protocols"])
        out.append([d[c] for c in TOKEN_COLUMNS])
    return out
