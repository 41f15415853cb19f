"""Teams in the database: create, list, change, delete; the registry loads them all."""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson

from metergate.storage.database import Database, Transaction
from metergate.storage.keys import encode_tags
from metergate.teams import TeamBudget, TeamRecord

_COLUMNS = "name, description, tags, budgets, rpm, tpm, created_at, updated_at"


class TeamExists(Exception):
    """A team with this name exists."""


IN_USE_SHOWN = 10  # key names a refused delete quotes


class TeamInUse(Exception):
    """Active keys still belong to the team: the first few names, and how many in all."""

    def __init__(self, keys: list[str], count: int) -> None:
        self.keys, self.count = keys, count
        super().__init__(named_keys(keys, count))


def named_keys(keys: list[str], count: int) -> str:
    """ "a, b, c" or, when `keys` are the first of more, "a, b, c and 1,234 more"."""
    more = count - len(keys)
    return ", ".join(keys) + (f" and {more:,} more" if more > 0 else "")


def _record(row: Sequence[Any]) -> TeamRecord:
    budgets = tuple(
        TeamBudget(
            b["period"],
            Decimal(b["limit_usd"]),
            b["hard"],
            b["timezone"],
            tuple(b["alert_at_percent"]),
        )
        for b in orjson.loads(row[3])
    )
    return TeamRecord(
        name=row[0],
        description=row[1],
        tags=tuple(sorted(orjson.loads(row[2]).items())) if row[2] else (),
        budgets=budgets,
        rpm=row[4],
        tpm=row[5],
        created_at=row[6],
        updated_at=row[7],
    )


def _budgets_json(budgets: Sequence[TeamBudget]) -> str:
    return orjson.dumps([b.to_json() for b in budgets]).decode()


async def list_teams(database: Database) -> list[TeamRecord]:
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM teams ORDER BY name")
    return [_record(row) for row in rows]


async def get_team(database: Database, name: str) -> TeamRecord | None:
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM teams WHERE name = ?", (name,))
    return _record(rows[0]) if rows else None


async def create_team(database: Database, values: dict[str, Any]) -> TeamRecord:
    """`values`: validated by `teams.check_change(..., creating=True)`."""
    if await get_team(database, values["name"]) is not None:
        raise TeamExists(values["name"])
    now = time.time()
    record = TeamRecord(
        name=values["name"],
        description=values.get("description", ""),
        tags=values.get("tags", ()),
        budgets=values.get("budgets", ()),
        rpm=values.get("rpm"),
        tpm=values.get("tpm"),
        created_at=now,
        updated_at=now,
    )
    try:
        await database.execute(
            f"INSERT INTO teams ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.name,
                record.description,
                encode_tags(record.tags),
                _budgets_json(record.budgets),
                record.rpm,
                record.tpm,
                now,
                now,
            ),
        )
    except Exception:
        if await get_team(database, record.name) is not None:  # created meanwhile
            raise TeamExists(record.name) from None
        raise
    return record


async def update_team(database: Database, name: str, values: dict[str, Any]) -> TeamRecord | None:
    """Change the fields in `values`, and only those (one UPDATE of their columns, so a
    concurrent change of another field is kept); None when there is no such team."""
    encode = {
        "description": lambda description: description,
        "tags": encode_tags,
        "budgets": _budgets_json,
        "rpm": lambda rpm: rpm,
        "tpm": lambda tpm: tpm,
    }
    changes = [(column, encode[column](values[column])) for column in encode if column in values]
    columns = "".join(f"{column} = ?, " for column, _ in changes)
    async with database.transaction() as tx:
        changed = await tx.execute(
            f"UPDATE teams SET {columns}updated_at = ? WHERE name = ?",
            (*(value for _, value in changes), time.time(), name),
        )
        if not changed:
            return None
        rows = await tx.fetch(f"SELECT {_COLUMNS} FROM teams WHERE name = ?", (name,))
    return _record(rows[0])


async def team_keys(
    database: Database | Transaction, name: str, limit: int
) -> tuple[list[str], int]:
    """The first `limit` names (alphabetically) of the active keys that belong to the
    team, and how many there are in all (a team may hold a key per end user)."""
    rows = await database.fetch(
        "SELECT name FROM keys WHERE team = ? AND revoked_at IS NULL ORDER BY name LIMIT ?",
        (name, limit),
    )
    if len(rows) < limit:
        return [key for (key,) in rows], len(rows)
    ((count,),) = await database.fetch(
        "SELECT COUNT(*) FROM keys WHERE team = ? AND revoked_at IS NULL", (name,)
    )
    return [key for (key,) in rows], int(count)


async def delete_team(database: Database, name: str) -> bool:
    """Delete a team no active key belongs to; False when there is no such team.

    One transaction that locks the team's row first: a key joining the team at the same
    moment (`keys.hold_team`) either committed before, and is seen here (TeamInUse), or
    waits and then finds no team (TeamMissing)."""
    async with database.transaction() as tx:
        found = await tx.fetch(
            "SELECT name FROM teams WHERE name = ?" + tx.lock_rows("UPDATE"), (name,)
        )
        if not found:
            return False
        keys, count = await team_keys(tx, name, IN_USE_SHOWN)
        if count:
            raise TeamInUse(keys, count)
        await tx.execute("DELETE FROM teams WHERE name = ?", (name,))
    return True
