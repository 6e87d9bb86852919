"""Usage statistics per token: last used, uses per hour and day, protocols, distinct IPs.

Counters are applied in batches (see ``recorder``), never one write per request. The IP
table keeps at most ``max_ips`` addresses per token: the least recently seen one goes.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One decided request about a known token."""

    token_id: str
    ts: float
    protocol: str
    peer_ip: str | None
    granted: bool


def apply(conn: sqlite3.Connection, events: Iterable[UsageEvent], max_ips: int) -> None:
    """Fold a batch into the counters. Call inside a transaction."""
    hourly: Counter[tuple[str, int, str, bool]] = Counter()
    ips: dict[tuple[str, str], tuple[int, float]] = {}
    last_used: dict[str, float] = {}
    for e in events:
        hourly[(e.token_id, int(e.ts // 3600), e.protocol, e.granted)] += 1
        if e.granted:
            last_used[e.token_id] = max(e.ts, last_used.get(e.token_id, 0.0))
        if e.peer_ip:
            count, seen = ips.get((e.token_id, e.peer_ip), (0, 0.0))
            ips[(e.token_id, e.peer_ip)] = (count + 1, max(seen, e.ts))
    for (token_id, hour, protocol, granted), n in hourly.items():
        column = "granted" if granted else "denied"
        conn.execute(
            f"INSERT INTO usage_hourly (token_id, hour, protocol, {column}) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT DO UPDATE SET {column} = {column} + excluded.{column}",
            (token_id, hour, protocol, n),
        )
    for (token_id, ip), (n, seen) in ips.items():
        conn.execute(
            "INSERT INTO usage_ips (token_id, ip, count, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET count = count + excluded.count, "
            "last_seen = max(last_seen, excluded.last_seen)",
            (token_id, ip, n, seen),
        )
    for token_id in {t for t, _ in ips}:
        conn.execute(
            "DELETE FROM usage_ips WHERE token_id = ? AND ip NOT IN (SELECT ip FROM usage_ips "
            "WHERE token_id = ? ORDER BY last_seen DESC LIMIT ?)",
            (token_id, token_id, max_ips),
        )
    conn.executemany(
        "UPDATE tokens SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
        [(ts, token_id) for token_id, ts in last_used.items()],
    )


HOURS_KEPT_IN_STATS = 7 * 24  # the hourly series a stats answer carries (one week)


def stats(conn: sqlite3.Connection, token_id: str) -> dict[str, Any]:
    """Last used, per-hour (last week), per-day and per-protocol counts, and the IP table."""
    row = conn.execute("SELECT last_used_at FROM tokens WHERE id = ?", (token_id,)).fetchone()
    per_day = [
        {"day": int(day), "granted": int(g), "denied": int(d)}
        for day, g, d in conn.execute(
            "SELECT hour / 24, sum(granted), sum(denied) FROM usage_hourly WHERE token_id = ? "
            "GROUP BY hour / 24 ORDER BY hour / 24",
            (token_id,),
        )
    ]
    per_protocol = {
        str(p): {"granted": int(g), "denied": int(d)}
        for p, g, d in conn.execute(
            "SELECT protocol, sum(granted), sum(denied) FROM usage_hourly WHERE token_id = ? "
            "GROUP BY protocol ORDER BY protocol",
            (token_id,),
        )
    }
    ips = [
        {"ip": str(ip), "count": int(n), "last_seen": float(seen)}
        for ip, n, seen in conn.execute(
            "SELECT ip, count, last_seen FROM usage_ips WHERE token_id = ? "
            "ORDER BY last_seen DESC",
            (token_id,),
        )
    ]
    per_hour = [
        {"hour": int(hour), "granted": int(g), "denied": int(d)}
        for hour, g, d in conn.execute(
            "SELECT hour, sum(granted), sum(denied) FROM usage_hourly WHERE token_id = ? "
            "GROUP BY hour ORDER BY hour DESC LIMIT ?",
            (token_id, HOURS_KEPT_IN_STATS),
        )
    ][::-1]
    return {
        "token_id": token_id,
        "last_used_at": row[0] if row else None,
        "per_hour": per_hour,
        "uses": sum(d["granted"] for d in per_day),
        "denied": sum(d["denied"] for d in per_day),
        "per_day": per_day,
        "per_protocol": per_protocol,
        "ips": ips,
    }


def prune(conn: sqlite3.Connection, before: float) -> None:
    """Drop counters older than ``before`` (same retention as the audit log)."""
    conn.execute("DELETE FROM usage_hourly WHERE hour < ?", (int(before // 3600),))
    conn.execute("DELETE FROM usage_ips WHERE last_seen < ?", (before,))
