"""Runs last (see conftest): no token created during the session is in any file it wrote.

Files that hold a token on purpose (a publisher token file) are named ``*.secret`` or lie in
a directory named ``creds`` (a stand-in for systemd's ``$CREDENTIALS_DIRECTORY``).
Everything else under the session's temporary directory — state databases with their WAL
and SHM files, daemon logs, exports — must contain neither a token nor its secret part.
"""

from __future__ import annotations

import pytest

from tests.conftest import ISSUED, TOKEN_RE


def test_no_token_in_any_database_or_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".secret")
             and "creds" not in p.parts]
    databases = [p for p in files if p.name.startswith("agent.db") or p.suffix == ".db"]
    if len(ISSUED) < 20 or not databases:
        pytest.skip("run with the whole suite: it checks what the other tests wrote")
    secrets = [t.encode() for t in ISSUED] + [t[17:60].encode() for t in ISSUED]
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path}: {s[:16]!r}…" for s in secrets if s in data]
        leaks += [f"{path}: token-shaped {m[:16]}…"
                  for m in TOKEN_RE.findall(data.decode("latin-1"))]
    assert not leaks, "\n".join(leaks)
