"""Every applied config, stored with a version id, hash and time: the history that
`metergate config history` lists and `metergate config rollback` returns to.

The table is append-only; the newest row is the config the fleet should run. Configs
are stored as written, `${ENV}` references and all, so secrets never reach the table.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from metergate.storage.database import Database


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    id: int
    hash: str
    source: str
    body: str
    applied_at: float
    note: str


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


_COLUMNS = "id, hash, source, body, applied_at, note"


async def latest(database: Database) -> ConfigVersion | None:
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM config_versions ORDER BY id DESC LIMIT 1")
    return ConfigVersion(*rows[0]) if rows else None


async def get(database: Database, version: int) -> ConfigVersion | None:
    rows = await database.fetch(f"SELECT {_COLUMNS} FROM config_versions WHERE id = ?", (version,))
    return ConfigVersion(*rows[0]) if rows else None


async def history(database: Database, limit: int = 20) -> list[ConfigVersion]:
    rows = await database.fetch(
        f"SELECT {_COLUMNS} FROM config_versions ORDER BY id DESC LIMIT ?", (limit,)
    )
    return [ConfigVersion(*row) for row in rows]


async def record(database: Database, body: str, source: str, note: str) -> ConfigVersion:
    """Append `body` as the newest version unless it already is; return the newest."""
    current = await latest(database)
    digest = text_hash(body)
    if current is not None and current.hash == digest:
        return current
    await database.execute(
        "INSERT INTO config_versions (hash, source, body, applied_at, note) VALUES (?, ?, ?, ?, ?)",
        (digest, source, body, time.time(), note),
    )
    newest = await latest(database)
    assert newest is not None
    return newest
