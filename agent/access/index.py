"""The access service's in-memory token index, built so the garbage collector skips it.

A relay may sync 100,000 tokens. Kept as :class:`TokenRecord` objects (each with its own
``Scope`` and ``frozenset``), they were 300,000 objects the cyclic garbage collector walks
in every full collection: 0.1-0.3 s with the event loop (or the worker thread that happens
to trigger it, which holds the GIL) stopped. The index therefore keeps each token as the
**row** the database returned: an exact ``tuple`` of strings, numbers, bytes and None.
CPython stops tracking such a tuple at its first collection, and a dict holding only
untracked values at the next full one, so 100,000 tokens cost the collector nothing
(``gc.is_tracked`` says so; tests/unit/test_token_index.py checks it). A record is built
from its row when asked for (about 1.5 µs) and the last few hundred are kept built.

Rows come from :mod:`agent.access.store` (``COLUMNS`` is the order of their values).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any, TypeVar, overload

from agent.access.model import Origin, Permission, Protocol, Scope, TokenRecord
from agent.access.tokens import Kind

#: The tokens table's columns in the order of a row's values.
COLUMNS = (
    "id", "kind", "scope", "secret_hash", "last4", "protocols", "permission", "created_at",
    "expires_at", "ttl", "label", "created_by", "origin", "revoked_at", "replaced_by",
    "replaces", "last_used_at", "max_sessions", "rev",
)
Row = tuple[Any, ...]
_REVOKED_AT = COLUMNS.index("revoked_at")

#: Records kept built for lookups (authorize, the session sweep); all of them are dropped
#: when full, so the number of tracked objects the index holds stays bounded.
HOT = 512
#: Distinct scopes and protocol lists parsed once and shared. A database with more
#: distinct values than this still works (they are parsed on each use beyond it).
_SHARED_MAX = 4096

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


def _members(kind: type[E]) -> dict[str, E]:
    return {m.value: m for m in kind}


_KINDS = _members(Kind)
_ORIGINS = _members(Origin)
_PERMISSIONS = _members(Permission)
_SCOPES: dict[str, tuple[str, Scope]] = {}
_PROTOCOLS: dict[str, tuple[str, frozenset[Protocol]]] = {}


def _member(members: dict[str, E], kind: type[E], value: str) -> E:
    found = members.get(value)
    return kind(value) if found is None else found  # ValueError for a value not of ``kind``


def _scope(text: str) -> tuple[str, Scope]:
    """(the shared copy of ``text``, its Scope); ValueError if it is not a scope."""
    found = _SCOPES.get(text)
    if found is None:
        found = (text, Scope.parse(text))
        if len(_SCOPES) < _SHARED_MAX:
            _SCOPES[text] = found
    return found


def _protocols(text: str) -> tuple[str, frozenset[Protocol]]:
    """(the shared copy of ``text``, its protocols): ``"rtsp,webrtc"``, ``""`` for all."""
    found = _PROTOCOLS.get(text)
    if found is None:
        found = (text, frozenset(Protocol(p) for p in text.split(",") if p))
        if len(_PROTOCOLS) < _SHARED_MAX:
            _PROTOCOLS[text] = found
    return found


def compact(row: Row) -> Row:
    """A database row as the index keeps it: checked now (a bad value fails in the reader's
    thread, not in ``authorize``), its few-valued strings (kind, scope, protocols,
    permission, origin) shared between rows, a plain tuple of plain values."""
    (tid, kind, scope, secret_hash, last4, protocols, permission, created_at, expires_at,
     ttl, label, created_by, origin, revoked_at, replaced_by, replaces, last_used_at,
     max_sessions, rev) = row
    return (tid, _member(_KINDS, Kind, kind).value, _scope(scope)[0], bytes(secret_hash), last4,
            _protocols(protocols)[0],
            None if not permission else _member(_PERMISSIONS, Permission, permission).value,
            created_at, expires_at, ttl, label, created_by,
            _member(_ORIGINS, Origin, origin).value, revoked_at, replaced_by, replaces,
            last_used_at, max_sessions, rev)


#: The slots' setters in COLUMNS order. A record built with them takes ~1.4 µs against
#: ~2.3 µs through the frozen dataclass's ``__init__`` (which calls ``object.__setattr__``
#: per field), and ``authorize`` builds one per lookup of a token not kept built (HOT).
_SETTERS = tuple(getattr(TokenRecord, name).__set__ for name in COLUMNS)
if set(COLUMNS) != set(TokenRecord.__dataclass_fields__):  # pragma: no cover
    raise RuntimeError("TokenRecord's fields and the tokens table's columns differ")


def record(row: Row, _new: Any = object.__new__) -> TokenRecord:
    """The TokenRecord of a row (database or compact); ValueError for a bad value."""
    (tid, kind, scope, secret_hash, last4, protocols, permission, created_at, expires_at,
     ttl, label, created_by, origin, revoked_at, replaced_by, replaces, last_used_at,
     max_sessions, rev) = row
    scoped = _SCOPES.get(scope) or _scope(scope)
    allowed = _PROTOCOLS.get(protocols) or _protocols(protocols)
    built: TokenRecord = _new(TokenRecord)
    for setter, value in zip(_SETTERS, (
            tid, _KINDS.get(kind) or Kind(kind), scoped[1], bytes(secret_hash), last4,
            allowed[1], _PERMISSIONS.get(permission) or Permission(permission)
            if permission else None, created_at, expires_at, ttl, label, created_by,
            _ORIGINS.get(origin) or Origin(origin), revoked_at, replaced_by, replaces,
            last_used_at, max_sessions, rev), strict=True):
        setter(built, value)
    return built


class TokenIndex(Mapping[str, TokenRecord]):
    """Token id → TokenRecord, held as compact rows (see the module's doc)."""

    __slots__ = ("_hot", "_rows")

    def __init__(self, rows: Iterable[Row] = ()) -> None:
        """``rows``: compact rows (:func:`compact`)."""
        self._rows: dict[str, Row] = {row[0]: row for row in rows}
        self._hot: dict[str, TokenRecord] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._rows

    def __getitem__(self, token_id: str) -> TokenRecord:
        found = self.get(token_id)
        if found is None:
            raise KeyError(token_id)
        return found

    @overload
    def get(self, token_id: str, /) -> TokenRecord | None: ...
    @overload
    def get(self, token_id: str, default: TokenRecord | T, /) -> TokenRecord | T: ...

    def get(self, token_id: str, default: TokenRecord | T | None = None
            ) -> TokenRecord | T | None:
        found = self._hot.get(token_id)
        if found is not None:
            return found
        row = self._rows.get(token_id)
        if row is None:
            return default
        found = record(row)
        if len(self._hot) >= HOT:
            self._hot.clear()
        self._hot[token_id] = found
        return found

    def apply(self, rows: Iterable[Row]) -> list[str]:
        """Take changed compact rows. Returns the ids of tokens whose row would have undone
        (or moved later) a revocation the index already holds: their revocation is kept
        (the store refuses such a change itself; enforcement never relies on one guard)."""
        kept: list[str] = []
        for changed in rows:
            token_id, row = changed[0], changed
            known = self._rows.get(token_id)
            if known is not None and known[_REVOKED_AT] is not None and (
                    row[_REVOKED_AT] is None or row[_REVOKED_AT] > known[_REVOKED_AT]):
                kept.append(token_id)
                row = (*row[:_REVOKED_AT], known[_REVOKED_AT], *row[_REVOKED_AT + 1:])
            self._rows[token_id] = row
            self._hot.pop(token_id, None)
        return kept
