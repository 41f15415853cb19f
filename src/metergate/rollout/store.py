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


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


async def load(database: Database, rollout: Rollout) -> bool:
    """Refresh `rollout` from the database; False when it was never started."""
    rows = await database.fetch(
        "SELECT state, stage, stage_started_at, failures, last_judgment FROM rollouts "
        "WHERE name = ?",
        (rollout.name,),
    )
    if not rows:
        return False
    state, stage, started, failures, judgment = rows[0]
    if (state, stage, started) != (rollout.state, rollout.stage, rollout.stage_started_at):
        rollout.reset_window()
    rollout.state = state
    rollout.stage = min(int(stage), len(rollout.config.stages) - 1)
    rollout.stage_started_at = float(started)
    rollout.failures = int(failures)
    rollout.last_judgment = orjson.loads(judgment)
    return True


async def save(database: Database, rollout: Rollout) -> None:
    values = (
        rollout.state,
        rollout.stage,
        rollout.stage_started_at,
        rollout.failures,
        orjson.dumps(rollout.last_judgment).decode(),
        time.time(),
    )
    await database.execute(
        "INSERT INTO rollouts (name, state, stage, stage_started_at, failures, last_judgment,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
        " state = excluded.state, stage = excluded.stage,"
        " stage_started_at = excluded.stage_started_at, failures = excluded.failures,"
        " last_judgment = excluded.last_judgment, updated_at = excluded.updated_at",
        (rollout.name, *values),
    )


async def record_event(
    database: Database, rollout: Rollout, event: str, detail: dict[str, Any]
) -> None:
    await database.execute(
        "INSERT INTO rollout_events (ts, rollout, event, stage, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), rollout.name, event, rollout.stage, orjson.dumps(detail).decode()),
    )


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
