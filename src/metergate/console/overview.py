"""The overview page's numbers: spend and forecast, per-model traffic, budgets.

Money is integer nano-USD, as in the ledger; the browser turns it into dollars. Days
and months are UTC, like `metergate usage`; each budget keeps its own period and zone.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from metergate.budgets.book import Budget, ledger_spend
from metergate.budgets.period import period_bounds
from metergate.console.series import model_series
from metergate.console.windows import Window
from metergate.metering.report import (
    Spend,
    UsageFilter,
    UsageGroup,
    month_forecast,
    spend_between,
    spend_by,
    usage_summary,
)
from metergate.runtime import Runtime
from metergate.storage.database import Database

_FALLBACK_SOFT_PERCENT = 80


def _utc_midnight(now: float) -> float:
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


def group_json(group: UsageGroup) -> dict[str, Any]:
    return {
        "requests": group.requests,
        "errors": group.errors,
        "refused": group.refused,
        "error_rate": group.error_rate,
        "p95_ms": group.p95_ms,
        "cost_nano": group.cost_nano,
        "saved_nano": group.saved_nano,
        "input_tokens": group.input_tokens,
        "cached_input_tokens": group.cached_input_tokens,
        "output_tokens": group.output_tokens,
    }


async def day_and_month(
    database: Database, group_by: str, now: float, only: UsageFilter | None = None
) -> tuple[dict[str, Spend], dict[str, Spend]]:
    """Requests and spend per group (key, team, ...) today and this month, UTC, up to
    `now`."""
    midnight = _utc_midnight(now)
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    month_start = dt.datetime.combine(day.replace(day=1), dt.time(), dt.UTC).timestamp()
    today = await spend_by(database, group_by, midnight, now, only)
    return today, await spend_by(database, group_by, month_start, now, only)


async def spend(database: Database, now: float) -> dict[str, Any]:
    today = await spend_between(database, _utc_midnight(now), now)
    forecast = await month_forecast(database, now, "UTC")
    return {
        "today_nano": today,
        "month": forecast.month,
        "month_nano": forecast.so_far_nano,
        "forecast_nano": forecast.projected_nano,
        "daily_rate_nano": forecast.daily_nano,
        "forecast_basis_days": round(forecast.basis_days, 3),
        "remaining_days": round(forecast.remaining_days, 3),
    }


def soft_percent(budget: Budget) -> int:
    """Where a bar turns amber: the highest alert threshold below 100% (80% if none)."""
    below = [p for p in budget.config.alert_at_percent if p < 100]
    return max(below) if below else _FALLBACK_SOFT_PERCENT


async def budget_json(database: Database, budget: Budget, now: float) -> dict[str, Any]:
    """A budget as the ledger (the fleet's source of truth) sees its current period."""
    cfg = budget.config
    start, end = period_bounds(now, cfg.period, cfg.timezone)
    spent = await ledger_spend(database, Budget(budget.name, cfg, budget.limit_nano, start, end))
    soft = soft_percent(budget)
    percent = 100 * spent / budget.limit_nano if budget.limit_nano else 0.0
    state = "exceeded" if percent >= 100 else "warning" if percent >= soft else "ok"
    return {
        "name": budget.name,
        "scope": cfg.scope,
        "target": cfg.target,
        "period": cfg.period,
        "timezone": cfg.timezone,
        "period_start": start,
        "period_end": end,
        "hard": cfg.hard,
        "limit_nano": budget.limit_nano,
        "spent_nano": spent,
        "reserved_nano": budget.reserved_nano,
        "percent": round(percent, 3),
        "soft_percent": soft,
        "alert_at_percent": list(cfg.alert_at_percent),
        "state": state,
    }


async def budgets(runtime: Runtime, database: Database, now: float) -> list[dict[str, Any]]:
    return [await budget_json(database, b, now) for b in runtime.plan.budgets.budgets]


async def overview(runtime: Runtime, database: Database, window: Window) -> dict[str, Any]:
    now = time.time()
    groups = await usage_summary(database, "model", now - window.seconds, now)
    return {
        "window": window.name,
        "now": now,
        "spend": await spend(database, now),
        "totals": group_json(groups[-1]),
        "models": [{"model": g.name, **group_json(g)} for g in groups[:-1]],
        "series": await model_series(database, window, now),
        "budgets": await budgets(runtime, database, now),
    }
