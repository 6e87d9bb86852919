"""Token wire format (docs/tokens.md), shared with TheRelay cloud.

    tra_Ab3dE5gH7jK9_<43-char secret><6-char checksum>

- prefix: ``tra`` access, ``trp`` publisher, ``trk`` admin, then ``_``;
- 12 base62 characters of public id, then ``_``;
- 43 base62 characters: 256 random bits from :mod:`secrets`, zero-padded;
- 6 base62 characters: CRC32 of everything before them, zero-padded.

Shape and checksum are checked offline, before any lookup: a wrong shape is ``malformed``,
a right shape with a bad checksum is ``corrupted`` (a token damaged in copy and paste).
Only the SHA-256 of the whole token is ever stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from dataclasses import dataclass
from enum import StrEnum

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_LEN = 12
SECRET_LEN = 43  # ceil(256 / log2(62))
CHECKSUM_LEN = 6  # 62**6 > 2**32
TOKEN_LEN = 4 + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN

_SHAPE = re.compile(r"(tr[apk])_([0-9A-Za-z]{12})_[0-9A-Za-z]{49}")
_ID_SHAPE = re.compile(r"[0-9A-Za-z]{12}")
#: Anything token-shaped inside a longer text (for redaction); a truncated tail still matches.
#: No word boundary in front: a token glued to other text (``x=%3Dtra_…``, ``\x01tra_…``) is
#: still a token. ``%5F`` is a percent-encoded ``_`` (the other characters need no encoding).
TOKEN_IN_TEXT = re.compile(r"(tr[apk])(?:_|%5[Ff])([0-9A-Za-z]{12})(?:_|%5[Ff])[0-9A-Za-z]{4,}")


class Kind(StrEnum):
    """What a token is for; the value is the kind's name, the prefix is in ``PREFIX``."""

    ACCESS = "access"
    PUBLISHER = "publisher"
    ADMIN = "admin"


PREFIX: dict[Kind, str] = {Kind.ACCESS: "tra", Kind.PUBLISHER: "trp", Kind.ADMIN: "trk"}
KIND_OF_PREFIX: dict[str, Kind] = {p: k for k, p in PREFIX.items()}


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(ALPHABET[digit])
    if value:
        raise ValueError("value does not fit the width")
    return "".join(reversed(chars))


_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]  # 62**2 two-digit groups


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of ``body`` (the token without its checksum)."""
    # Same digits as _base62(crc, 6), three at a time: this runs on every authorization.
    v = zlib.crc32(body.encode("ascii"))
    return _PAIRS[v // 14_776_336] + _PAIRS[v // 3844 % 3844] + _PAIRS[v % 3844]


def token_hash(token: str) -> bytes:
    """SHA-256 of the whole token: the only form in which a token is stored."""
    return hashlib.sha256(token.encode("ascii")).digest()


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token whose shape and checksum are right; says nothing about whether it is valid."""

    kind: Kind
    public_id: str
    text: str

    @property
    def display(self) -> str:
        return display(self.kind, self.public_id, self.text[-4:])


class FormatProblem(StrEnum):
    """Why a string is not a usable token, decided offline."""

    MALFORMED = "malformed"
    CORRUPTED = "corrupted"


def check(text: str) -> str | FormatProblem:
    """Shape, then checksum; the public id of a well-formed token. Never raises."""
    if len(text) != TOKEN_LEN or _SHAPE.fullmatch(text) is None:
        return FormatProblem.MALFORMED
    if checksum(text[:-CHECKSUM_LEN]) != text[-CHECKSUM_LEN:]:
        return FormatProblem.CORRUPTED
    return text[4:16]


def parse(text: str) -> ParsedToken | FormatProblem:
    """Like :func:`check`, with the token's kind. Never raises on any input."""
    result = check(text)
    if isinstance(result, FormatProblem):
        return result
    return ParsedToken(KIND_OF_PREFIX[text[:3]], result, text)


def new_public_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(ID_LEN))


def generate(kind: Kind, public_id: str | None = None) -> ParsedToken:
    """A fresh token of ``kind``: 256 random bits of secret, checksummed."""
    pid = public_id if public_id is not None else new_public_id()
    if not is_public_id(pid):
        raise ValueError("public id must be 12 base62 characters")
    body = f"{PREFIX[kind]}_{pid}_{_base62(secrets.randbits(256), SECRET_LEN)}"
    return ParsedToken(kind, pid, body + checksum(body))


def is_public_id(text: str) -> bool:
    return _ID_SHAPE.fullmatch(text) is not None


def display(kind: Kind, public_id: str, last4: str) -> str:
    """The only form in which a token is shown after creation: ``tra_<id>…<last 4>``."""
    return f"{PREFIX[kind]}_{public_id}…{last4}"


def redact(text: str) -> str:
    """Replace every token-shaped substring with its display form (no secret left)."""
    if "tr" not in text:
        return text
    return TOKEN_IN_TEXT.sub(lambda m: f"{m.group(1)}_{m.group(2)}…[redacted]", text)
