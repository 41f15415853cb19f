"""The overview page's numbers: spend and forecast, per-model traffic, budgets.

Money is integer nano-USD, as in the ledger; the browser turns it into dollars. Days
and months are UTC, like `metergate usage`; each budget keeps its own period and zone.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

from metergate.budgets.budget import Budget, ledger_spend
from metergate.budgets.each import EachBudget, ledger_count_each, ledger_spend_each
from metergate.budgets.period import period_bounds
from metergate.console.long_windows import long_window
from metergate.console.series import model_series
from metergate.console.windows import Window
from metergate.limits.admission import Gate
from metergate.metering.hourly import HOUR
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
_OWN_LIMITS_LISTED = 500  # keys with limits of their own named in one query, at most


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


def soft_percent(budget: Budget | EachBudget) -> int:
    """Where a bar turns amber: the highest alert threshold below 100% (80% if none)."""
    below = [p for p in budget.config.alert_at_percent if p < 100]
    return max(below) if below else _FALLBACK_SOFT_PERCENT


async def budget_json(database: Database, gate: Gate, budget: Budget, now: float) -> dict[str, Any]:
    """A budget as the ledger (the fleet's source of truth) sees its current period, and
    what requests in flight hold on it wherever they run (`gate`: the plan's)."""
    cfg = budget.config
    start, end = period_bounds(now, cfg.period, cfg.timezone)
    counted = Budget(budget.name, cfg, budget.limit_nano, start, end, target=budget.target)
    spent = await ledger_spend(database, counted)
    (held,) = await gate.held_nano((budget,))
    return _bar(budget, budget.target, (start, end), spent, held)


def share_of(each: EachBudget, target: str, limit_nano: int, now: float) -> Budget:
    """One target's share of a budget for each, in the period of `now`, to be asked what
    is held on it: with what this process's member (if any) holds, for when the holds
    are this process's alone."""
    cfg = each.config
    start, end = period_bounds(now, cfg.period, cfg.timezone)
    share = Budget(each.name, cfg, limit_nano, start, end, target=target)
    member = each.members.get(target)
    if member is not None and member.start == start:
        share.reserved_nano = member.reserved_nano
    return share


async def each_json(
    database: Database, gate: Gate, each: EachBudget, now: float, own: dict[str, int]
) -> dict[str, Any]:
    """A budget for each key (team, model) as the ledger sees its current period: the
    bar is the one that spent most (`top_target`), with what its requests in flight
    hold; `past_soft` counts those at or past their amber mark (a hard limit refuses
    before a key's spend reaches it), each key at its own limit when it has one (`own`:
    key name -> nano-USD)."""
    cfg = each.config
    start, end = period_bounds(now, cfg.period, cfg.timezone)
    top = await ledger_spend_each(database, each, start, end, top=1)
    target, spent = next(iter(top.items()), (None, 0))
    soft = soft_percent(each)
    amber = each.limit_nano * soft // 100
    past_soft = await ledger_count_each(database, each, start, end, amber)
    if own:  # keys with a limit of their own: counted by it, not by the default
        many = len(own) > _OWN_LIMITS_LISTED  # then every spender: fewer than the names
        spenders = await ledger_spend_each(
            database, each, start, end, only=None if many else list(own)
        )
        for name, limit in own.items():
            spent_by = spenders.get(name, 0)
            past_soft += (spent_by * 100 >= limit * soft) - (spent_by >= amber)
    held = 0  # the bar is the top target's: so is what it shows held
    if target is not None:
        (held,) = await gate.held_nano((share_of(each, target, each.limit_nano, now),))
    bar = _bar(each, cfg.target, (start, end), spent, held)
    return {**bar, "each": True, "top_target": target, "past_soft": past_soft}


async def shares_json(
    database: Database,
    gate: Gate,
    each: EachBudget,
    names: Sequence[str],
    limits: dict[str, dict[str, int]],
    now: float,
) -> dict[str, dict[str, Any]]:
    """The share of each key in `names` of a budget for each key, as the ledger sees its
    current period (one query for all of them), at the key's own limit when `limits`
    (key name -> its own limits) gives one."""
    cfg = each.config
    start, end = period_bounds(now, cfg.period, cfg.timezone)
    spent = await ledger_spend_each(database, each, start, end, only=list(names))
    shares = [
        share_of(each, name, limits.get(name, {}).get(each.name, each.limit_nano), now)
        for name in names
    ]
    held = await gate.held_nano(shares)
    return {
        name: _bar(share, name, (start, end), spent.get(name, 0), held_by)
        for name, share, held_by in zip(names, shares, held, strict=True)
    }


def _bar(
    budget: Budget | EachBudget,
    target: str | None,
    period: tuple[float, float],
    spent: int,
    held: int,
) -> dict[str, Any]:
    """The fields of a budget's bar: `spent` of its limit in `period`, `held` in flight."""
    cfg = budget.config
    start, end = period
    soft = soft_percent(budget)
    percent = 100 * spent / budget.limit_nano if budget.limit_nano else 0.0
    state = "exceeded" if percent >= 100 else "warning" if percent >= soft else "ok"
    return {
        "name": budget.name,
        "scope": cfg.scope,
        "target": target,
        "period": cfg.period,
        "timezone": cfg.timezone,
        "period_start": start,
        "period_end": end,
        "hard": cfg.hard,
        "limit_nano": budget.limit_nano,
        "spent_nano": spent,
        "reserved_nano": held,
        "percent": round(percent, 3),
        "soft_percent": soft,
        "alert_at_percent": list(cfg.alert_at_percent),
        "state": state,
    }


async def budgets(runtime: Runtime, database: Database, now: float) -> list[dict[str, Any]]:
    book, gate = runtime.plan.budgets, runtime.plan.gate
    found = [await budget_json(database, gate, b, now) for b in book.budgets]
    for each in book.each:
        own = {}
        if each.config.scope == "key":  # keys' own limits (a plan), from the key index
            for record in runtime.keys.records():
                limit = dict(record.budget_limits).get(each.name)
                if limit is not None and record.revoked_at is None:
                    own[record.name] = limit
        found.append(await each_json(database, gate, each, now, own))
    return found


async def overview(runtime: Runtime, database: Database, window: Window) -> dict[str, Any]:
    now = time.time()
    if window.step >= HOUR:  # 7 and 30 days: from the sums by hour
        groups, series = await long_window(database, window, now)
    else:
        groups = await usage_summary(database, "model", now - window.seconds, now)
        series = await model_series(database, window, now)
    return {
        "window": window.name,
        "now": now,
        "spend": await spend(database, now),
        "totals": group_json(groups[-1]),
        "models": [{"model": g.name, **group_json(g)} for g in groups[:-1]],
        "series": series,
        "budgets": await budgets(runtime, database, now),
    }
