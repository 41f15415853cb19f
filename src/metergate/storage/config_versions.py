"""Every applied config, stored with a version id, hash and time: the history that
`metergate config history` lists and `metergate config rollback` returns to.

The table is append-only; the newest row is the config the fleet should run. Configs
are stored as written, `${ENV}` references and all, except for literal secrets: every
secret-bearing field's literal value is replaced by `${METERGATE_REDACTED}` before the
text reaches the table (`config.secrets`), and the version hash is taken of that
redacted text, so neither the table nor the `config_version` label of
`metergate_build_info` carries or fingerprints a secret. Applying a stored version
again puts the secrets back from the live config (`with_secrets`).
"""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import yaml

from metergate.config.secrets import redact, restore
from metergate.storage.database import Database


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    id: int
    hash: str
    source: str
    body: str  # redacted: literal secrets replaced by ${METERGATE_REDACTED}
    applied_at: float
    note: str


def text_hash(text: str) -> str:
    """The version id of a config text: a hash of its redacted form, so a text and its
    stored copy have the same version."""
    return hashlib.sha256(redact(text).encode("utf-8")).hexdigest()[:12]


_COLUMNS = "id, hash, source, body, applied_at, note"
_scrubbed: weakref.WeakSet[Database] = weakref.WeakSet()


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


async def record(database: Database, text: str, source: str, note: str) -> ConfigVersion:
    """Append `text`, redacted, as the newest version unless it already is; return the
    newest."""
    await _scrub(database)
    body = redact(text)
    digest = text_hash(body)
    current = await latest(database)
    if current is not None and current.hash == digest:
        return current
    await database.execute(
        "INSERT INTO config_versions (hash, source, body, applied_at, note) VALUES (?, ?, ?, ?, ?)",
        (digest, source, body, time.time(), note),
    )
    newest = await latest(database)
    assert newest is not None
    return newest


def with_secrets(version: ConfigVersion, live: str | None, running: str | None = None) -> str:
    """The version's text with its literal secrets back. `live`: this machine's config
    file (a replica's own secrets are its own): used whole when it is this very version,
    else each secret comes from the same key of that file or, failing that, of `running`
    (the text this process runs). ConfigError names a secret neither has."""
    live_text: str | None = None
    if live is not None:
        try:
            path = Path(live)
            live_text = path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, ValueError):
            live_text = None
    if live_text is not None:
        try:
            if redact(live_text) == version.body:
                return live_text
        except yaml.YAMLError:  # a file broken since: its secrets cannot be read
            live_text = None
    donors = [text for text in (live_text, running) if text is not None]
    return restore(version.body, *donors, name=f"config v{version.id} ({version.source})")


async def _scrub(database: Database) -> None:
    """Redact versions stored before secrets were (once per database and process), and
    make the database drop the old bytes: SQLite zeroes freed space and checkpoints its
    WAL away, PostgreSQL rewrites the table without the dead rows."""
    if database in _scrubbed:
        return
    rows = await database.fetch("SELECT id, body FROM config_versions")
    changed = []
    for version_id, body in rows:
        try:
            clean = redact(body)
        except yaml.YAMLError:  # cannot be checked for secrets: not kept
            clean = "# withheld: this version could not be checked for literal secrets\n"
        if clean != body:
            changed.append((clean, text_hash(clean), version_id))
    if changed:
        sqlite = database.dialect == "sqlite"
        if sqlite:
            await database.execute("PRAGMA secure_delete = ON")
        for row in changed:
            await database.execute(
                "UPDATE config_versions SET body = ?, hash = ? WHERE id = ?", row
            )
        if sqlite:
            await database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await database.execute("PRAGMA secure_delete = OFF")
        else:
            await database.execute("VACUUM FULL config_versions")
    _scrubbed.add(database)
