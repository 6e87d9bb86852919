"""Token format: generation, parsing, checksum, display and redaction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.access import tokens
from agent.access.tokens import ALPHABET, TOKEN_LEN, FormatProblem, Kind, parse
from tests.conftest import TOKEN_RE

KINDS = st.sampled_from(list(Kind))


@given(KINDS)
def test_generated_tokens_round_trip(kind: Kind) -> None:
    token = tokens.generate(kind)
    assert len(token.text) == TOKEN_LEN == 66
    assert token.text.startswith(tokens.PREFIX[kind] + "_" + token.public_id + "_")
    assert parse(token.text) == token


@given(KINDS, st.data())
def test_any_single_character_change_is_caught(kind: Kind, data: st.DataObject) -> None:
    text = tokens.generate(kind).text
    pos = data.draw(st.integers(0, len(text) - 1))
    new = data.draw(st.sampled_from([c for c in ALPHABET + "_-" if c != text[pos]]))
    changed = text[:pos] + new + text[pos + 1 :]
    result = parse(changed)
    assert isinstance(result, FormatProblem), changed
    # A change that keeps the shape is corrupted (checksum), one that breaks it is malformed.
    if TOKEN_RE.fullmatch(changed):
        assert result is FormatProblem.CORRUPTED
    else:
        assert result is FormatProblem.MALFORMED


@given(st.text(max_size=100))
def test_parse_never_raises_and_rejects_arbitrary_text(text: str) -> None:
    assert parse(text) in (FormatProblem.MALFORMED, FormatProblem.CORRUPTED)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t[:-1], FormatProblem.MALFORMED),  # truncated
        (lambda t: t + "x", FormatProblem.MALFORMED),  # extended
        (lambda t: "trx" + t[3:], FormatProblem.MALFORMED),  # unknown prefix
        (lambda t: t.replace("_", "-", 1), FormatProblem.MALFORMED),
        (lambda t: " " + t[1:], FormatProblem.MALFORMED),
        (lambda t: t[:20] + ("A" if t[20] != "A" else "B") + t[21:], FormatProblem.CORRUPTED),
        (lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"), FormatProblem.CORRUPTED),
        (lambda t: "trp" + t[3:], FormatProblem.CORRUPTED),  # prefix is covered by the CRC
    ],
)
def test_format_problems(mutate, expected) -> None:
    assert parse(mutate(tokens.generate(Kind.ACCESS).text)) is expected


def test_secret_carries_256_random_bits() -> None:
    secrets_seen = {tokens.generate(Kind.ACCESS).text[17:60] for _ in range(200)}
    assert len(secrets_seen) == 200
    assert all(len(s) == 43 for s in secrets_seen)
    # 43 base62 digits hold 2**256 - 1, and nothing bigger is ever produced.
    assert int.bit_length(62**43 - 1) >= 256


def test_display_shows_id_and_last_four_only() -> None:
    token = tokens.generate(Kind.ADMIN)
    assert token.display == f"trk_{token.public_id}…{token.text[-4:]}"
    assert token.text[17:60] not in token.display


def test_redact_replaces_every_token_in_text() -> None:
    a, p = tokens.generate(Kind.ACCESS), tokens.generate(Kind.PUBLISHER)
    text = f"GET /whep/cam1?token={a.text} and Bearer {p.text}; truncated {a.text[:30]}"
    out = tokens.redact(text)
    assert a.text not in out and p.text not in out and a.text[17:30] not in out
    assert f"tra_{a.public_id}…[redacted]" in out
    assert f"trp_{p.public_id}…[redacted]" in out


def test_public_id_is_validated() -> None:
    with pytest.raises(ValueError, match="12 base62"):
        tokens.generate(Kind.ACCESS, public_id="short")
    assert tokens.generate(Kind.ACCESS, public_id="A" * 12).public_id == "A" * 12
