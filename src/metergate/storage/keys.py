"""Gateway keys in the database: create, list, change, revoke, load for the key index.

Every change of a key stamps its row with the next number of the `key_changes` counter
(`_next_change`, in the change's transaction), so the key index can ask for the keys
changed since the number it last saw (`keys_changed`). The counter's row is locked
until the change commits, so changes commit in the order of their numbers: a reader
that sees number N has every change numbered below it too, and skips none.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import orjson

from metergate.auth.keys import KeyRecord, generate_key, hash_key
from metergate.storage.database import Database, Transaction, UniqueViolation

_MANY = 1000  # keys read at once beyond which their records are built in a thread
_COLUMNS = (
    "id, name, key_hash, hint, models, created_at, revoked_at, max_tokens_cap, team, tags, "
    "expires_at, budget_limits, rpm, tpm"
)


class KeyNameTaken(Exception):
    """An active key already has this name."""


class TeamMissing(Exception):
    """A key was to join a team that does not exist (or was deleted meanwhile)."""


async def _next_change(tx: Transaction) -> int:
    rows = await tx.fetch("UPDATE key_changes SET seq = seq + 1 WHERE id = 1 RETURNING seq")
    return int(rows[0][0])


async def hold_team(tx: Transaction, team: str | None) -> None:
    """Check that `team` exists and keep it from being deleted until `tx` ends (a shared
    row lock on PostgreSQL; SQLite's transaction holds the write lock): a key joins a
    team atomically, never one that `teams.delete_team` removes at the same moment."""
    if team is not None and not await tx.fetch(
        "SELECT 1 FROM teams WHERE name = ?" + tx.lock_rows("SHARE"), (team,)
    ):
        raise TeamMissing(team)


async def create_key(
    database: Database,
    name: str,
    models: list[str] | None = None,
    max_tokens_cap: int | None = None,
    team: str | None = None,
    tags: dict[str, str] | None = None,
    expires_at: float | None = None,
    budget_limits: dict[str, Decimal] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> tuple[str, KeyRecord]:
    """Create a key; return the secret (shown once, never stored) and its record.
    KeyNameTaken when an active key has the name, also one created at the same moment
    (the unique index on active names decides; its violation is this error, not a 500);
    TeamMissing when `team` does not exist."""
    secret = generate_key()
    record = KeyRecord(
        id="key_" + secrets.token_hex(8),
        name=name,
        key_hash=hash_key(secret),
        hint=secret[-4:],
        models=tuple(models) if models else None,
        created_at=time.time(),
        max_tokens_cap=max_tokens_cap,
        team=team,
        tags=tuple(sorted((tags or {}).items())),
        expires_at=expires_at,
        budget_limits=_nanos(budget_limits),
        rates=_rates(rpm, tpm),
    )
    try:
        async with database.transaction() as tx:
            taken = "SELECT 1 FROM keys WHERE name = ? AND revoked_at IS NULL"
            if await tx.fetch(taken, (name,)):
                raise KeyNameTaken(name)
            await hold_team(tx, team)
            await tx.execute(
                f"INSERT INTO keys ({_COLUMNS}, change_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.key_hash,
                    record.hint,
                    orjson.dumps(list(record.models)).decode() if record.models else None,
                    record.created_at,
                    None,
                    record.max_tokens_cap,
                    record.team,
                    encode_tags(record.tags),
                    record.expires_at,
                    encode_limits(budget_limits),
                    rpm,
                    tpm,
                    await _next_change(tx),
                ),
            )
    except UniqueViolation:
        raise KeyNameTaken(name) from None
    return secret, record


async def list_keys(database: Database, include_revoked: bool = True) -> list[KeyRecord]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM keys{where} ORDER BY created_at")
    return [_record(row) for row in rows]


# Listing order: keys not revoked first, then by name, then id (names repeat among
# revoked keys). Expired keys are not revoked: they list among the active ones.
_REVOKED = "CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END"
KeyState = Literal["active", "expired", "revoked", "all"]
_STATES: dict[str, str] = {  # the condition of each state; `?` is now
    "active": "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
    "expired": "revoked_at IS NULL AND expires_at <= ?",
    "revoked": "revoked_at IS NOT NULL",
}


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of keys in listing order; `after` is the last one's place, from which
    the next page starts (None when this is the last page), `matched` how many keys the
    filters match on every page together."""

    records: list[KeyRecord]
    after: tuple[int, str, str] | None
    matched: int


async def page_of_keys(
    database: Database,
    limit: int,
    after: tuple[int, str, str] | None = None,
    state: KeyState = "all",
    search: str | None = None,
    team: str | None = None,
) -> KeyPage:
    """Up to `limit` keys after the place `after` (keyset paging: a key created or revoked
    meanwhile never shifts a page). `search` matches part of a name (any case), or a
    key's id or the last four characters of its secret (its hint) exactly."""
    where: list[str] = []
    params: list[Any] = []
    if state != "all":
        where.append(_STATES[state])
        params += [time.time()] * _STATES[state].count("?")
    if search:
        where.append("(LOWER(name) LIKE ? ESCAPE '!' OR id = ? OR hint = ?)")
        pattern = search.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
        params += [f"%{pattern}%", search, search]
    if team is not None:
        where.append("team = ?")
        params.append(team)
    filters = " WHERE " + " AND ".join(where) if where else ""
    ((matched,),) = await database.fetch(f"SELECT COUNT(*) FROM keys{filters}", tuple(params))
    if after is not None:
        where.append(f"({_REVOKED}, name, id) > (?, ?, ?)")
        params += list(after)
    filters = " WHERE " + " AND ".join(where) if where else ""
    rows = await database.fetch(
        f"SELECT {_COLUMNS}, {_REVOKED} FROM keys{filters} ORDER BY {_REVOKED}, name, id LIMIT ?",
        (*params, limit + 1),
    )
    records = _records(rows[:limit])
    last = None
    if len(rows) > limit:  # another page follows: it starts after this page's last key
        last = (int(rows[limit - 1][-1]), records[-1].name, records[-1].id)
    return KeyPage(records, last, int(matched))


async def keys_changed(database: Database, since: int) -> tuple[list[KeyRecord], int]:
    """The keys changed after change number `since` (every key for -1), and the highest
    change number among them (`since` when none changed)."""
    rows = await database.fetch(
        f"SELECT {_COLUMNS}, change_seq FROM keys WHERE change_seq > ?", (since,)
    )
    last = max((int(row[-1]) for row in rows), default=since)
    if len(rows) > _MANY:  # ~5 us a key: 100000 would hold the event loop for 0.5 s
        return await asyncio.to_thread(_records, rows), last
    return _records(rows), last


def _records(rows: Sequence[Sequence[Any]]) -> list[KeyRecord]:
    return [_record(row) for row in rows]


async def key_by_id(database: Database, key_id: str) -> KeyRecord | None:
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (key_id,))
    return _record(rows[0]) if rows else None


async def find_keys(database: Database, digests: Sequence[str]) -> list[KeyRecord]:
    """The keys with these hashes (an indexed lookup: `key_hash` is unique)."""
    if not digests:
        return []
    marks = ", ".join("?" * len(digests))
    rows = await database.fetch(
        f"SELECT {_COLUMNS} FROM keys WHERE key_hash IN ({marks})", tuple(digests)
    )
    return [_record(row) for row in rows]


def _record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        key_hash=row[2],
        hint=row[3],
        models=tuple(orjson.loads(row[4])) if row[4] else None,
        created_at=row[5],
        revoked_at=row[6],
        max_tokens_cap=row[7],
        team=row[8],
        tags=tuple(sorted(orjson.loads(row[9]).items())) if row[9] else (),
        expires_at=row[10],
        budget_limits=_nanos(_decode_limits(row[11])),
        rates=_rates(row[12], row[13]),
    )


def encode_limits(limits: dict[str, Decimal] | None) -> str | None:
    """A key's budget limits as the database keeps them: {name: "USD"}, or NULL for none."""
    if not limits:
        return None
    texts = {name: format(amount, "f") for name, amount in limits.items()}
    return orjson.dumps(texts, option=orjson.OPT_SORT_KEYS).decode()


def _decode_limits(text: str | None) -> dict[str, Decimal]:
    return {name: Decimal(usd) for name, usd in orjson.loads(text).items()} if text else {}


def _rates(rpm: int | None, tpm: int | None) -> tuple[int | None, int | None] | None:
    return None if rpm is None and tpm is None else (rpm, tpm)


def _nanos(limits: dict[str, Decimal] | None) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((name, int(usd * 1_000_000_000)) for name, usd in (limits or {}).items()))


def encode_tags(tags: Sequence[tuple[str, str]] | dict[str, str] | None) -> str | None:
    """Tags as the database keeps them: a JSON object, or NULL for none."""
    pairs = dict(tags.items() if isinstance(tags, dict) else tags or ())
    return orjson.dumps(pairs, option=orjson.OPT_SORT_KEYS).decode() if pairs else None


async def change_key(database: Database, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
    """Change the fields named in `changes` (`models`: a list or None for all,
    `max_tokens_cap`, `team`, `tags`, `expires_at`, `budget_limits`, `rpm`, `tpm`) of the
    key with this id if it is not revoked, and only those: one UPDATE of those columns,
    so a concurrent change of another field is kept. The key as it is afterwards (a
    revoked one unchanged); None when no key has the id; TeamMissing when `team` names no
    team."""
    encode = {
        "models": lambda models: orjson.dumps(list(models)).decode() if models else None,
        "max_tokens_cap": lambda cap: cap,
        "team": lambda team: team,
        "tags": encode_tags,
        "expires_at": lambda when: when,
        "budget_limits": encode_limits,
        "rpm": lambda rpm: rpm,
        "tpm": lambda tpm: tpm,
    }
    unknown = set(changes) - set(encode)
    if unknown:
        raise ValueError(f"not a changeable key field: {', '.join(sorted(unknown))}")
    async with database.transaction() as tx:
        select = f"SELECT {_COLUMNS} FROM keys WHERE id = ?"
        rows = await tx.fetch(select, (key_id,))
        if not rows or rows[0][6] is not None or not changes:  # none, revoked, no change
            return _record(rows[0]) if rows else None
        await hold_team(tx, changes.get("team"))
        columns = ", ".join(f"{name} = ?" for name in [*changes, "change_seq"])
        values = [encode[name](value) for name, value in changes.items()]
        values.append(await _next_change(tx))
        await tx.execute(
            f"UPDATE keys SET {columns} WHERE id = ? AND revoked_at IS NULL", (*values, key_id)
        )
        rows = await tx.fetch(select, (key_id,))
    return _record(rows[0])


async def revoke_key(database: Database, name_or_id: str) -> int:
    """Revoke the active key with this name or id; return how many were revoked."""
    async with database.transaction() as tx:
        matches = await tx.fetch(
            "SELECT id FROM keys WHERE (name = ? OR id = ?) AND revoked_at IS NULL",
            (name_or_id, name_or_id),
        )
        for (key_id,) in matches:
            await revoke(tx, key_id)
    return len(matches)


async def revoke(tx: Transaction, key_id: str) -> None:
    """Revoke the key with this id, unless it already is."""
    await tx.execute(
        "UPDATE keys SET revoked_at = ?, change_seq = ? WHERE id = ? AND revoked_at IS NULL",
        (time.time(), await _next_change(tx), key_id),
    )
