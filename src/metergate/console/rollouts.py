"""Rollouts for the console: stage, weights, gates against the last judgment, history,
and the manual transitions (the same `rollout.transitions` the CLI and controller use)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from metergate.rollout import Rollout, store, transitions
from metergate.rollout.state import COMPLETED, PAUSED, PENDING, ROLLED_BACK, RUNNING
from metergate.runtime import Runtime
from metergate.storage.database import Database

Action = transitions.Action
ACTIONS: dict[str, Action] = {
    "start": transitions.start,
    "pause": transitions.pause,
    "resume": transitions.resume,
    "promote": transitions.promote,
    "rollback": transitions.rollback,
}
# Which buttons make sense in which state (mirrors the checks in rollout.transitions).
ALLOWED = {
    PENDING: ("start",),
    RUNNING: ("pause", "promote", "rollback"),
    PAUSED: ("resume", "promote", "rollback"),
    COMPLETED: ("start", "rollback"),
    ROLLED_BACK: ("start",),
}


def rollout_json(rollout: Rollout, events: list[tuple[Any, ...]]) -> dict[str, Any]:
    cfg = rollout.config
    weight = rollout.weight if rollout.active else 0.0
    history = []
    for ts, event, stage, detail in events:
        parsed = orjson.loads(detail) if detail else {}
        # A controller's decision carries its judgment; a failed gate's detail *is* one.
        judgment = parsed.get("judgment") or (parsed if "verdict" in parsed else {})
        history.append(
            {
                "ts": float(ts),
                "event": event,
                "stage": int(stage),
                "stage_percent": cfg.stages[min(int(stage), len(cfg.stages) - 1)],
                "by": parsed.get("by") or ("controller" if judgment else None),
                "verdict": judgment.get("verdict") or parsed.get("verdict"),
                "failed_gates": judgment.get("failed_gates") or parsed.get("failed_gates") or [],
            }
        )
    return {
        "name": rollout.name,
        "model": cfg.model,
        "state": rollout.state,
        "stage": rollout.stage,
        "stages": cfg.stages,
        "stage_percent": cfg.stages[rollout.stage],
        "stage_started_at": rollout.stage_started_at if rollout.active else None,
        "weights": {
            "candidate": {"upstreams": cfg.candidate, "share": weight},
            "baseline": {"upstreams": cfg.baseline, "share": 1 - weight},
        },
        "gates": cfg.gates.model_dump(),
        "min_requests": cfg.min_requests,
        "interval_seconds": cfg.interval_seconds,
        "failures": rollout.failures,
        "failure_threshold": cfg.failure_threshold,
        "source": cfg.source,
        "next_decision_at": rollout.next_decision_at() if rollout.state == RUNNING else None,
        "last_judgment": rollout.last_judgment or None,
        "live": {
            "candidate": rollout.candidate_stats.summary(),
            "baseline": rollout.baseline_stats.summary(),
        },
        "actions": list(ALLOWED.get(rollout.state, ())),
        "history": history,
    }


async def rollouts(runtime: Runtime, database: Database) -> dict[str, Any]:
    """Every configured rollout, refreshed from the database (another process or the CLI
    may have moved it since this process's controller last looked)."""
    rows = []
    for name, rollout in runtime.plan.rollouts.rollouts.items():
        async with rollout.lock:  # not in the middle of an action's load and save
            await store.load(database, rollout)
        rows.append(rollout_json(rollout, await store.events(database, name, 30)))
    return {"now": time.time(), "rollouts": rows}
