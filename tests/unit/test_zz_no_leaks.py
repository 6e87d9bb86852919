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
SECRET_PART = 43  # characters of a token's secret looked for (its first 43 of 49)
PERCENT_ENCODED = re.compile(r"tr[apk](?:_|%5[Ff])[0-9A-Za-z]{12}(?:_|%5[Ff])[0-9A-Za-z]{49}")


#: Letters and digits long enough to hold a token's secret part (``token[17:60]``).
ALNUM_RUN = re.compile(rb"[0-9A-Za-z]{%d,}" % SECRET_PART)


def secret_parts(tokens: set[str]) -> set[bytes]:
    return {t[17:17 + SECRET_PART].encode() for t in tokens}


def leaks_in(data: bytes, parts: set[bytes]) -> list[str]:
    """Token-shaped strings (whole tokens, glued or percent-encoded), and any issued
    token's secret part inside a run of letters and digits. One pass over the data: each
    run is looked up window by window in a set (the suite issues thousands of tokens; a
    substring search per token took minutes)."""
    text = data.decode("latin-1")
    found = [f"token-shaped {m[:16]}…" for m in TOKEN_RE.findall(text)
             + PERCENT_ENCODED.findall(text)]
    for match in ALNUM_RUN.finditer(data):
        run = match.group()
        for i in range(len(run) - SECRET_PART + 1):
            if run[i:i + SECRET_PART] in parts:
                found.append(f"secret part {run[i:i + 8]!r}…")
                break
    return found


def test_no_token_in_any_database_or_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".secret")
             and "creds" not in p.parts]
    databases = [p for p in files if p.name.startswith("agent.db") or p.suffix == ".db"]
    if len(ISSUED) < 20 or not databases:
        pytest.skip("run with the whole suite: it checks what the other tests wrote")
    parts = secret_parts(ISSUED)
    leaks = [f"{path}: {leak}" for path in files for leak in leaks_in(path.read_bytes(), parts)]
    assert not leaks, "\n".join(leaks)


def test_an_issued_secret_part_is_found_anywhere() -> None:
    """The check above fires on a token's secret part alone, glued to letters or not."""
    from agent.access.tokens import Kind, generate

    token = generate(Kind.ACCESS).text
    parts = secret_parts({token})
    secret = token[17:]
    for data in (secret.encode(), f"abc{secret}xyz".encode(), f"x={secret[:45]};".encode(),
                 b"\x00" + token[10:].encode()):
        assert leaks_in(data, parts), data
    assert not leaks_in(f"x={secret[:40]};".encode(), parts)  # shorter than the part


def test_the_patterns_find_glued_and_encoded_tokens() -> None:
    """The leak check itself fires on the forms that once escaped redaction."""
    from agent.access.tokens import Kind, generate

    token = generate(Kind.ACCESS).text
    for text in (f"x{token}", f"%3D{token}y", "\x01" + token, token.replace("_", "%5F"),
                 token.replace("_", "%5f")):
        assert TOKEN_RE.findall(text) or PERCENT_ENCODED.findall(text), text
