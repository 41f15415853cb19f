"""A budget's state: its spend in the current period, what requests in flight hold, the
thresholds announced; and what the ledger (the source of truth) says it spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metergate.config.model import EACH, BudgetConfig
from metergate.metering.hourly import spend_source
from metergate.storage.database import Database


@dataclass(slots=True, eq=False)
class Budget:
    name: str
    config: BudgetConfig
    limit_nano: int
    start: float = 0.0
    end: float = 0.0
    spent_nano: int = 0
    reserved_nano: int = 0  # held by this process's requests in flight (in-process mode)
    # settled here while Redis was unreachable, not yet shared: (the tenth of a second
    # its ledger rows are dated in, nano-USD) (`shared.counters._keep_dated`)
    unsynced: list[tuple[int, int]] = field(default_factory=list)
    announced: set[int] = field(default_factory=set)
    # its slot in the table the workers of a host share (`budgets.host`): (period start,
    # index, the slot's name hash), found once a period
    host_slot: tuple[float, int, int] | None = None
    spent_gauge: Any = None  # its metergate_budget_spent_usd value, looked up once
    target: str | None = None  # whose spend it counts: the config's, or an `EACH` member's
    # one key's (team's, model's) share of an `EachBudget`: no gauge of its own
    member: bool = field(init=False)
    # the budget a reload rebuilt this one as (same requests, another period or time
    # zone): it took over this one's holds, and the requests in flight here settle there
    successor: Budget | None = None

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.config.target
        self.member = self.config.target == EACH

    def describe(self) -> str:
        target = "" if self.config.scope == "global" else f" {self.target}"
        return f"{self.config.scope}{target}, per {self.config.period}"


def passed(budget: Budget) -> set[int]:
    """The thresholds its spend has reached: announced before (or not worth announcing)."""
    return {
        p
        for p in budget.config.alert_at_percent
        if budget.spent_nano * 100 >= budget.limit_nano * p
    }


SCOPE_COLUMNS = {"key": "key_name", "model": "model", "team": "team"}


async def ledger_spend(database: Database, budget: Budget, until: float | None = None) -> int:
    """What the ledger (the source of truth) says this budget spent in its period
    (by requests that finished before `until`, when given)."""
    end = budget.end if until is None else min(budget.end, until)
    where, among = "", []
    if budget.config.scope != "global":
        where, among = f" AND {SCOPE_COLUMNS[budget.config.scope]} = ?", [budget.target]
    keys = budget.config.scope == "key"
    source, params = spend_source(budget.start, end, where, among, keys=keys)
    ((spent,),) = await database.fetch(f"SELECT COALESCE(SUM(cost_nano), 0) FROM {source}", params)
    return int(spent)
