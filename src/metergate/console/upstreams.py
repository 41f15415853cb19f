"""Upstream health: circuit state and load now, plus what the ledger saw in a window.

From the ledger (every process of the fleet, over the window): requests each upstream
ended, by outcome; retries (attempts beyond the first of the requests it ended as one of
the model's own deployments); fallbacks served (requests for a model this upstream is
not a deployment of, so it served as a fallback). From this process's counters since
it started: attempts by outcome (every try, including the ones that were retried
elsewhere) and fallbacks from/to it. The 7- and 30-day windows read the ledger's sums by
hour, as the Overview's do (`console.long_windows`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

from metergate.console.long_windows import Counts, read_hours, window_start
from metergate.console.overview import group_json
from metergate.console.samples import samples
from metergate.console.windows import Window
from metergate.metering.hourly import HOUR
from metergate.metering.report import UsageGroup, usage_summary
from metergate.routing.circuit import STATE_NAMES
from metergate.runtime import Plan, Runtime
from metergate.storage.database import Database

_OUTCOMES_SQL = """SELECT upstream, model, outcome, COUNT(*),
  SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END)
FROM requests WHERE ts >= ? AND ts < ? GROUP BY upstream, model, outcome"""


def _own_deployments(plan: Plan) -> dict[str, set[str]]:
    """For each model, the upstreams that serve it without a fallback."""
    own: dict[str, set[str]] = {}
    for name, route in plan.router.routes.items():
        own[name] = {d.name for d in (*route.deployments, *route.baseline, *route.candidate)}
    return own


def _process_counters(runtime: Runtime) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    attempts: dict[str, dict[str, float]] = defaultdict(dict)
    fallbacks: dict[str, dict[str, float]] = defaultdict(lambda: {"from": 0.0, "to": 0.0})
    names = {"metergate_upstream_attempts_total", "metergate_fallbacks_total"}
    for sample in samples(runtime.metrics.registry, names):
        labels = sample.labels
        if sample.name == "metergate_upstream_attempts_total":
            attempts[labels["upstream"]][labels["outcome"]] = sample.value
        else:
            fallbacks[labels["from_upstream"]]["from"] += sample.value
            fallbacks[labels["to_upstream"]]["to"] += sample.value
    return attempts, fallbacks


class _Window:
    """What the ledger says of each upstream over the window."""

    def __init__(self, own: dict[str, set[str]]) -> None:
        self.own = own
        self.summary: dict[str, UsageGroup] = {}
        self.outcomes: dict[str, dict[str, int]] = defaultdict(dict)
        self.retries: dict[str, int] = defaultdict(int)
        self.fallback_served: dict[str, int] = defaultdict(int)

    def add(self, upstream: str, model: str, outcome: str, count: int, extra: int) -> None:
        """`count` requests it ended with `outcome`, `extra` attempts beyond their first."""
        self.outcomes[upstream][outcome] = self.outcomes[upstream].get(outcome, 0) + count
        if model in self.own and upstream not in self.own[model]:
            self.fallback_served[upstream] += count  # its extra attempts were elsewhere
        else:
            self.retries[upstream] += extra


async def _from_rows(database: Database, seen: _Window, window: Window, now: float) -> None:
    start = now - window.seconds
    groups = await usage_summary(database, "upstream", start, now)
    seen.summary = {str(g.name): g for g in groups[:-1]}
    for upstream, model, outcome, count, extra in await database.fetch(_OUTCOMES_SQL, (start, now)):
        seen.add(upstream, model, outcome, int(count), int(extra or 0))


async def _from_hours(database: Database, seen: _Window, window: Window, now: float) -> None:
    """7 and 30 days: from the ledger's sums by hour, as the Overview's long windows."""
    usage, latency = await read_hours(database, window_start(window, now), now)
    found: dict[str, Counts] = defaultdict(Counts)
    for _, model, upstream, outcome, *values in usage:
        found[upstream].add_usage(outcome, values)
        seen.add(upstream, model, outcome, values[0], values[-1])
    for _, _, upstream, kind, bin_, count in latency:
        found[upstream].add_latency(kind, bin_, count)
    seen.summary = {upstream: counts.group(upstream) for upstream, counts in found.items()}


async def upstreams(runtime: Runtime, database: Database, window: Window) -> dict[str, Any]:
    plan = runtime.plan  # one config throughout, whatever reloads during the queries
    now = time.time()
    seen = _Window(_own_deployments(plan))
    read = _from_hours if window.step >= HOUR else _from_rows
    await read(database, seen, window, now)
    # In a thread: with several workers this merges every worker's metric files.
    attempts, fallbacks = await asyncio.to_thread(_process_counters, runtime)
    models_of: dict[str, list[str]] = defaultdict(list)
    for model, names in seen.own.items():
        for name in sorted(names):
            models_of[name].append(model)
    rows = []
    for name, deployment in plan.router.deployments.items():
        config = plan.config.upstreams[name]
        breaker = deployment.breaker
        group = seen.summary.get(name)
        rows.append(
            {
                "name": name,
                "provider": config.provider,
                "provider_type": plan.config.providers[config.provider].type,
                "model": deployment.model,
                "weight": deployment.weight,
                "serves": models_of.get(name, []),
                "circuit": STATE_NAMES[breaker.state],
                "circuit_retry_in": round(breaker.retry_in(), 3) if breaker.state == 2 else None,
                "in_flight": deployment.in_flight,
                "window": {
                    **(group_json(group) if group else _empty()),
                    "outcomes": dict(sorted(seen.outcomes.get(name, {}).items())),
                    "retries": seen.retries.get(name, 0),
                    "fallbacks_served": seen.fallback_served.get(name, 0),
                },
                "since_start": {
                    "attempts": dict(sorted(attempts.get(name, {}).items())),
                    "fallbacks_from": fallbacks[name]["from"] if name in fallbacks else 0.0,
                    "fallbacks_to": fallbacks[name]["to"] if name in fallbacks else 0.0,
                },
            }
        )
    return {"window": window.name, "now": now, "upstreams": rows}


def _empty() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors": 0,
        "refused": 0,
        "error_rate": None,
        "p95_ms": None,
        "cost_nano": 0,
        "saved_nano": 0,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
    }
