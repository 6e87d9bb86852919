"""Runs last (see conftest): no token created during the session is in any file it wrote.

Files that hold a token on purpose (a publisher token file) are named ``*.secret`` or lie in
a directory named ``creds`` (a stand-in for systemd's ``$CREDENTIALS_DIRECTORY``).
Everything else under the session's temporary directory — state databases with their WAL
and SHM files, daemon logs, exports — must contain neither a token nor its secret part, in
any form: glued to other text (no word boundary), or percent-encoded (``%5F`` for ``_``;
tests/integration/test_hostile.py sends such forms to the daemon on purpose).
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ISSUED, TOKEN_RE

#: A token with its underscores percent-encoded (``tra%5F…%5F…``), anywhere in a text.
PERCENT_ENCODED = re.compile(r"tr[apk](?:_|%5[Ff])[0-9A-Za-z]{12}(?:_|%5[Ff])[0-9A-Za-z]{49}")


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
        text = data.decode("latin-1")
        leaks += [f"{path}: token-shaped {m[:16]}…"
                  for m in TOKEN_RE.findall(text) + PERCENT_ENCODED.findall(text)]
    assert not leaks, "\n".join(leaks)


def test_the_patterns_find_glued_and_encoded_tokens() -> None:
    """The leak check itself fires on the forms that once escaped redaction."""
    from agent.access.tokens import Kind, generate

    token = generate(Kind.ACCESS).text
    for text in (f"x{token}", f"%3D{token}y", "\x01" + token, token.replace("_", "%5F"),
                 token.replace("_", "%5f")):
        assert TOKEN_RE.findall(text) or PERCENT_ENCODED.findall(text), text
