"""Rollout state in the ledger database, so a restart finds every rollout where it was
and every process of a fleet follows the same stage."""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any

import orjson

from metergate.rollout.state import Rollout
from metergate.storage.database import Database

LEASE = "rollout-controller"
ANNOUNCE_BATCH = 100  # events announced per tick at most: a backlog drains, bounded
_EVENTS_KEY = 0x6D677265  # "mgre": events are recorded one transaction at a time


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


async def load(database: Database, rollout: Rollout) -> bool:
    """Refresh `rollout` from the database; False when it was never started."""
    rows = await database.fetch(
        "SELECT state, stage, stage_started_at, failures, last_judgment, version FROM rollouts "
        "WHERE name = ?",
        (rollout.name,),
    )
    if not rows:
        return False
    state, stage, started, failures, judgment, version = rows[0]
    if (state, stage, started) != (rollout.state, rollout.stage, rollout.stage_started_at):
        rollout.reset_window()
    rollout.state = state
    rollout.stage = min(int(stage), len(rollout.config.stages) - 1)
    rollout.stage_started_at = float(started)
    rollout.failures = int(failures)
    rollout.last_judgment = orjson.loads(judgment)
    rollout.version = int(version)
    return True


async def save(
    database: Database,
    rollout: Rollout,
    event: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Save `rollout` (and record `event`, in the same transaction) if its row is still at
    the version it was loaded at; False, and nothing written, when another action of any
    process changed it meanwhile: the caller's decision was made on a stale state."""
    loaded_at = rollout.version
    values = (
        rollout.state,
        rollout.stage,
        rollout.stage_started_at,
        rollout.failures,
        orjson.dumps(rollout.last_judgment).decode(),
        time.time(),
    )
    async with database.transaction() as tx:
        if loaded_at == 0:  # never saved: only the first of concurrent starts inserts
            changed = await tx.execute(
                "INSERT INTO rollouts (name, state, stage, stage_started_at, failures,"
                " last_judgment, updated_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
                " ON CONFLICT (name) DO NOTHING",
                (rollout.name, *values),
            )
        else:
            changed = await tx.execute(
                "UPDATE rollouts SET state = ?, stage = ?, stage_started_at = ?, failures = ?,"
                " last_judgment = ?, updated_at = ?, version = version + 1"
                " WHERE name = ? AND version = ?",
                (*values, rollout.name, loaded_at),
            )
        if changed != 1:
            return False
        if event is not None:
            # Ids are read in order by the announcer (`unannounced`): one given here must
            # not commit after a later one, or the announcer, past the later, skips it.
            await tx.take_turns(_EVENTS_KEY)
            await tx.execute(
                "INSERT INTO rollout_events (ts, rollout, event, stage, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (time.time(), rollout.name, event, rollout.stage, orjson.dumps(detail).decode()),
            )
    rollout.version = loaded_at + 1
    return True


async def events(database: Database, name: str, limit: int = 20) -> list[tuple[Any, ...]]:
    rows = await database.fetch(
        "SELECT ts, event, stage, detail FROM rollout_events WHERE rollout = ? "
        "ORDER BY id DESC LIMIT ?",
        (name, limit),
    )
    return list(reversed(rows))


async def take_lease(database: Database, holder: str, seconds: float) -> bool:
    """Become (or stay) the one process that judges rollouts; others follow the database."""
    now = time.time()
    await database.execute(
        "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO NOTHING",
        (LEASE, holder, now + seconds),
    )
    await database.execute(
        "UPDATE leases SET holder = ?, expires_at = ? WHERE name = ? "
        "AND (holder = ? OR expires_at < ?)",
        (holder, now + seconds, LEASE, holder, now),
    )
    rows = await database.fetch("SELECT holder FROM leases WHERE name = ?", (LEASE,))
    return bool(rows) and rows[0][0] == holder


async def unannounced(
    database: Database, limit: int = ANNOUNCE_BATCH
) -> tuple[int, list[tuple[Any, ...]]]:
    """How far the lease holders have announced (the last event id), and the events
    recorded after it, oldest first: (id, ts, rollout, event, stage, detail)."""
    rows = await database.fetch("SELECT announced FROM leases WHERE name = ?", (LEASE,))
    position = int(rows[0][0]) if rows else 0
    events = await database.fetch(
        "SELECT id, ts, rollout, event, stage, detail FROM rollout_events WHERE id > ?"
        " ORDER BY id LIMIT ?",
        (position, limit),
    )
    return position, list(events)


async def claim_announced(database: Database, holder: str, position: int, through: int) -> bool:
    """Move the announced position from `position` to `through` for `holder`, before it
    announces those events: True only while it still holds the lease and no one moved
    the position since it was read. A holder that lost the lease (stopped for longer
    than its lease) or raced another announces nothing, so no event is announced twice."""
    async with database.transaction() as tx:
        changed = await tx.execute(
            "UPDATE leases SET announced = ? WHERE name = ? AND holder = ? AND announced = ?",
            (through, LEASE, holder, position),
        )
    return changed == 1
