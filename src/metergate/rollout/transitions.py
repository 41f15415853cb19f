"""Every change of a rollout's state, manual (CLI, admin API) or automatic (controller),
goes through here: it is checked, saved, and recorded as an event that the controller
announces.

The check is against the state the caller loaded, and the save is a compare-and-set on
that state's version (`store.save`): when another action, in this process or another one
sharing the database, changed the rollout in between, nothing is written and the action
is refused, as if it had come after. Callers hold `rollout.lock` from load to save, so
actions of one process take turns on its shared `Rollout`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from metergate.rollout import store
from metergate.rollout.state import COMPLETED, PAUSED, PENDING, ROLLED_BACK, RUNNING, Rollout
from metergate.storage.database import Database


class TransitionRefused(Exception):
    """The rollout is not in a state that allows this transition."""


class TransitionConflict(TransitionRefused):
    """Another action changed the rollout between this one's check and its save."""


Action = Callable[[Database, Rollout, str], Awaitable[None]]
ATTEMPTS = 5


async def apply(database: Database, rollout: Rollout, action: Action, by: str) -> None:
    """An operator's action on the rollout's current state: loaded, checked and saved as
    one step, as if the actions of every process came one after another. When another
    action got in between, the state it left is checked again (a rollback still rolls
    back a rollout promoted meanwhile; a promotion of one rolled back is refused)."""
    for attempt in range(ATTEMPTS):
        async with rollout.lock:
            await store.load(database, rollout)
            try:
                await action(database, rollout, by)
                return
            except TransitionConflict:
                if attempt == ATTEMPTS - 1:
                    raise


_VERBS = {
    "started": "start",
    "paused": "pause",
    "resumed": "resume",
    "promoted": "promote",
    "completed": "promote",
    "rolled_back": "roll back",
}


def _require(rollout: Rollout, allowed: tuple[str, ...], action: str) -> None:
    if rollout.state not in allowed:
        raise TransitionRefused(
            f"cannot {action} rollout {rollout.name!r}: it is {rollout.state.replace('_', ' ')}"
            f" (allowed from: {', '.join(allowed)})"
        )


async def _commit(database: Database, rollout: Rollout, event: str, detail: dict[str, Any]) -> None:
    if not await store.save(database, rollout, event, detail):
        await store.load(database, rollout)  # drop this action's changes: the row decides
        raise TransitionConflict(
            f"cannot {_VERBS.get(event, event)} rollout {rollout.name!r}: another action"
            f" changed it meanwhile; it is now {rollout.state.replace('_', ' ')} at stage"
            f" {rollout.stage + 1}; look at it again and retry if still wanted"
        )


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
