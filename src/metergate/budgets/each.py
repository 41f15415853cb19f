"""Budgets for each key (team, model) apart: `target: "*"` in the config.

One `EachBudget` holds a member (a `Budget` of its own) per key that made a request, made
on its first one from the spend the ledger gave every key in one grouped query, so any
number of keys costs one query, not one each. A key may carry its own limit of such a
budget (`KeyRecord.budget_limits`, its plan): `set_limit` gives the member that limit.
Members have no spend series in the metrics (one per key would be unbounded).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from metergate.budgets.budget import SCOPE_COLUMNS, Budget, passed
from metergate.budgets.period import period_bounds
from metergate.config.model import BudgetConfig
from metergate.metering.hourly import spend_source
from metergate.storage.database import Database


@dataclass(slots=True, eq=False)
class EachBudget:
    """A budget every key (team, model) has for itself (`target: "*"`). A member is made
    on its target's first request, with the spend `loaded` gave it when its period is
    the loaded one (targets absent there had spent nothing; since then, only members
    spend), else none: so one grouped ledger query serves any number of keys."""

    name: str
    config: BudgetConfig
    limit_nano: int
    start: float = 0.0  # the period `loaded` is of
    end: float = 0.0
    loaded: dict[str, int] = field(default_factory=dict)
    members: dict[str, Budget] = field(default_factory=dict)
    swept_until: float = 0.0  # members of periods ending before this were let go

    def member_for(self, target: str) -> Budget:
        found = self.members.get(target)
        if found is None:
            now = time.time()
            if now >= self.end:  # a period after the loaded one: nobody spent in it yet
                cfg = self.config
                self.start, self.end = period_bounds(now, cfg.period, cfg.timezone)
                self.loaded = {}
            found = Budget(
                self.name, self.config, self.limit_nano, self.start, self.end, target=target
            )
            found.spent_nano = self.loaded.pop(target, 0)
            found.announced = passed(found)
            self.members[target] = found
        return found

    def applies(self, key: str, model: str, team: str | None) -> str | None:
        """The target whose member a request of `key` for `model` counts on, if any."""
        scope = self.config.scope
        return key if scope == "key" else model if scope == "model" else team


def set_limit(each: EachBudget, member: Budget, limits: tuple[tuple[str, int], ...]) -> bool:
    """Give `member` of `each` the limit its key gives that budget in `limits` (a plan
    other than the default), else the budget's own; whether that changed it."""
    limit = each.limit_nano
    if limits and each.config.scope == "key":
        limit = dict(limits).get(each.name, limit)
    if member.limit_nano == limit:
        return False
    member.limit_nano = limit
    member.announced = passed(member)
    return True


async def ledger_spend_each(
    database: Database,
    each: EachBudget,
    start: float,
    end: float,
    top: int | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, int]:
    """What the ledger says each target of `each` spent from `start` to `end` (spenders
    only; with `top`, the `top` who spent most, most first; with `only`, of those)."""
    column = SCOPE_COLUMNS[each.config.scope]
    where, among = "", list(only or ())
    if only is not None:
        if not only:
            return {}
        where = f" AND {column} IN ({', '.join('?' * len(only))})"
    source, params = spend_source(start, end, where, among, keys=column == "key_name")
    sql = (
        f"SELECT {column}, SUM(cost_nano) AS spent FROM {source} WHERE {column} IS NOT NULL "
        f"GROUP BY {column} HAVING SUM(cost_nano) > 0"
    )
    if top is not None:
        sql += f" ORDER BY spent DESC, {column} LIMIT ?"
        params.append(top)
    rows = await database.fetch(sql, params)
    return {str(target): int(spent) for target, spent in rows}


async def ledger_count_each(
    database: Database, each: EachBudget, start: float, end: float, at_least_nano: int
) -> int:
    """How many targets of `each` spent at least `at_least_nano` from `start` to `end`."""
    column = SCOPE_COLUMNS[each.config.scope]
    source, params = spend_source(start, end, keys=column == "key_name")
    ((count,),) = await database.fetch(
        f"SELECT COUNT(*) FROM (SELECT {column} FROM {source} WHERE {column} IS NOT NULL "
        f"GROUP BY {column} HAVING SUM(cost_nano) >= ?) AS spenders",
        [*params, at_least_nano],
    )
    return int(count)
