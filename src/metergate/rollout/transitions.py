"""Every change of a rollout's state, manual (CLI) or automatic (controller), goes through
here: it is checked, saved, and recorded as an event that the controller announces."""

from __future__ import annotations

import time
from typing import Any

from metergate.rollout import store
from metergate.rollout.state import COMPLETED, PAUSED, PENDING, ROLLED_BACK, RUNNING, Rollout
from metergate.storage.database import Database


class TransitionRefused(Exception):
    """The rollout is not in a state that allows this transition."""


def _require(rollout: Rollout, allowed: tuple[str, ...], action: str) -> None:
    if rollout.state not in allowed:
        raise TransitionRefused(
            f"cannot {action} rollout {rollout.name!r}: it is {rollout.state.replace('_', ' ')}"
            f" (allowed from: {', '.join(allowed)})"
        )


async def _commit(database: Database, rollout: Rollout, event: str, detail: dict[str, Any]) -> None:
    await store.save(database, rollout)
    await store.record_event(database, rollout, event, detail)


def _enter_stage(rollout: Rollout, stage: int) -> None:
    rollout.stage = stage
    rollout.stage_started_at = time.time()
    rollout.failures = 0
    rollout.reset_window()


async def start(database: Database, rollout: Rollout, by: str = "operator") -> None:
    _require(rollout, (PENDING, ROLLED_BACK, COMPLETED), "start")
    rollout.state = RUNNING
    rollout.last_judgment = {}
    _enter_stage(rollout, 0)
    await _commit(database, rollout, "started", {"by": by})


async def pause(database: Database, rollout: Rollout, by: str = "operator") -> None:
    _require(rollout, (RUNNING,), "pause")
    rollout.state = PAUSED
    await _commit(database, rollout, "paused", {"by": by})


async def resume(database: Database, rollout: Rollout, by: str = "operator") -> None:
    _require(rollout, (PAUSED,), "resume")
    rollout.state = RUNNING
    _enter_stage(rollout, rollout.stage)  # judge on fresh numbers only
    await _commit(database, rollout, "resumed", {"by": by})


async def promote(
    database: Database,
    rollout: Rollout,
    by: str = "operator",
    judgment: dict[str, Any] | None = None,
) -> None:
    _require(rollout, (RUNNING, PAUSED), "promote")
    detail = {"by": by, "judgment": judgment} if judgment else {"by": by}
    if rollout.stage + 1 >= len(rollout.config.stages):
        rollout.state = COMPLETED
        await _commit(database, rollout, "completed", detail)
        return
    rollout.state = RUNNING
    _enter_stage(rollout, rollout.stage + 1)
    await _commit(database, rollout, "promoted", detail)


async def rollback(
    database: Database,
    rollout: Rollout,
    by: str = "operator",
    judgment: dict[str, Any] | None = None,
) -> None:
    _require(rollout, (RUNNING, PAUSED, COMPLETED), "roll back")
    rollout.state = ROLLED_BACK
    detail = {"by": by, "judgment": judgment} if judgment else {"by": by}
    await _commit(database, rollout, "rolled_back", detail)
