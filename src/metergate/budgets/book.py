"""The budget book: who may still spend, reserved before a call and settled after it.

A request reserves its worst-case cost on every budget that applies to it before the
upstream is called, and the check and the reservation happen with no `await` between
them, so concurrent requests in this process can never jointly pass a hard limit.
After the call the reservation is replaced by the real cost. Spend is in integer
nano-USD, like the ledger, and is rebuilt from the ledger at start.

This book holds the policy (which budgets apply, periods, thresholds, the refusal) and
the in-process counters. A budget with `target: "*"` is one budget for each key (team,
model) apart (`metergate.budgets.each`).

Besides the config's budgets it holds the teams' (managed in the database, installed by
`metergate.teams.registry` with `set_team_budgets`, carried over a reload like the
config's). With Redis configured, `metergate.limits.admission` reserves and settles on
the fleet's shared counters instead (`metergate.shared.counters`), and reports the
fleet's spend back here through `observe`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from metergate.budgets.budget import Budget, ledger_spend, passed
from metergate.budgets.each import EachBudget, ledger_spend_each, set_limit
from metergate.budgets.period import iso, period_bounds
from metergate.config.model import EACH, BudgetConfig
from metergate.errors import BudgetExceeded
from metergate.metering.estimate import WorstCase
from metergate.metering.metrics import Metrics, value_of
from metergate.metering.multiprocess import remove_series
from metergate.storage.database import Database
from metergate.webhooks import WebhookNotifier

log = logging.getLogger("metergate.budgets")


@dataclass(slots=True)
class Reservation:
    budgets: tuple[Budget, ...]
    amount_nano: int
    # where each budget's hold is in the workers' shared table (`budgets.host`), if there
    slots: tuple[int | None, ...] = ()


_NONE = Reservation((), 0)


class BudgetBook:
    def __init__(
        self,
        budgets: dict[str, BudgetConfig],
        metrics: Metrics,
        carry: BudgetBook | None = None,
    ) -> None:
        """`carry`: the book of the config being replaced; unchanged budgets keep their
        spend and reservations (requests in flight settle on the same objects)."""
        self.metrics = metrics
        previous = {b.name: b for b in carry.budgets} if carry else {}
        previous_each = {b.name: b for b in carry.each} if carry else {}
        self.budgets: list[Budget] = []
        self.each: list[EachBudget] = []
        self._carried: set[str] = set()
        self._teams: dict[str, Budget] = dict(carry._teams) if carry else {}
        self._changes: list[tuple[Budget | EachBudget, BudgetConfig]] = []  # by `take_over`
        self._rebuilt: list[tuple[Budget, Budget]] = []  # (replaced, new): by `take_over`
        now = time.time()
        for name, cfg in budgets.items():
            if cfg.target == EACH:
                self._add_each(name, cfg, previous_each.get(name))
                continue
            kept = previous.get(name)
            if kept is not None and _same_spend(kept.config, cfg):
                if kept.config != cfg:  # a new limit, hardness or alerts: same spend
                    self._changes.append((kept, cfg))
                self.budgets.append(kept)
                self._carried.add(name)
                continue
            budget = Budget(name, cfg, int(cfg.limit_usd * 1_000_000_000))
            budget.start, budget.end = period_bounds(now, cfg.period, cfg.timezone)
            metrics.budget_limit.labels(name).set(budget.limit_nano / 1e9)
            self.budgets.append(budget)
            if kept is not None and (kept.config.scope, kept.target) == (cfg.scope, cfg.target):
                self._rebuilt.append((kept, budget))
        self.budgets.extend(self._teams.values())
        self._carried.update(self._teams)
        self.notifier: WebhookNotifier = carry.notifier if carry else WebhookNotifier()
        self._applicable: dict[
            tuple[str, str, str | None, tuple[tuple[str, int], ...]], tuple[Budget, ...]
        ] = {}

    def _add_each(self, name: str, cfg: BudgetConfig, kept: EachBudget | None) -> None:
        """A budget for each target: kept over a reload (with its members) when it counts
        the same spend, else new (its spend read by `load`)."""
        if kept is not None and _same_spend(kept.config, cfg):
            if kept.config != cfg:
                self._changes.append((kept, cfg))
            self._carried.add(name)
        else:
            kept = EachBudget(name, cfg, int(cfg.limit_usd * 1_000_000_000))
        self.metrics.budget_limit.labels(name).set(kept.limit_nano / 1e9)
        self.each.append(kept)

    def __bool__(self) -> bool:
        return bool(self.budgets) or bool(self.each)

    def hard_limits(self) -> bool:
        return any(b.config.hard for b in self.budgets) or any(e.config.hard for e in self.each)

    def sweep(self, now: float | None = None) -> None:
        """Let go of members whose period has ended and who hold nothing (a key's next
        request makes it a new one, at 0 as it would roll to), once per period: members
        of keys gone since (revoked, or one per end user who never returns) would pile up
        for as long as the process runs."""
        if now is None:
            now = time.time()
        swept = False
        for each in self.each:
            if now < each.swept_until:
                continue
            cfg = each.config
            each.swept_until = period_bounds(now, cfg.period, cfg.timezone)[1]
            stale = [t for t, m in each.members.items() if m.end <= now and not m.reserved_nano]
            for target in stale:
                del each.members[target]
            swept = swept or bool(stale)
        if swept:  # cached tuples name the members let go: a key must find its new one
            self._applicable.clear()

    def members(self) -> list[Budget]:
        """Every key's (team's, model's) member of an `EachBudget` made so far."""
        return [member for each in self.each for member in each.members.values()]

    async def load(self, database: Database, only_new: bool = False) -> None:
        """Rebuild each budget's spend in its current period from the ledger."""
        for budget in self.loadable(only_new):
            budget.spent_nano = await ledger_spend(database, budget)
            budget.announced = passed(budget)
            self.metrics.budget_spent.labels(budget.name).set(budget.spent_nano / 1e9)
        for each in self.each:
            if only_new and each.name in self._carried:
                continue
            cfg = each.config
            each.start, each.end = period_bounds(time.time(), cfg.period, cfg.timezone)
            each.loaded = await ledger_spend_each(database, each, each.start, each.end)
            each.members = {}

    def take_over(self) -> None:
        """This book's config goes live: budgets kept over the reload with a new limit,
        hardness or thresholds take them now (not when the book was built, since a
        reload that fails after that leaves the running config as it was); budgets
        rebuilt for the same requests take over the holds of the ones they replace."""
        for replaced, rebuilt in self._rebuilt:
            _succeed(replaced, rebuilt)
        self._rebuilt.clear()
        for budget, config in self._changes:
            if isinstance(budget, EachBudget):
                budget.config, budget.limit_nano = config, int(config.limit_usd * 1_000_000_000)
                for member in budget.members.values():
                    _update(member, config)
            else:
                _update(budget, config)
            self.metrics.budget_limit.labels(budget.name).set(budget.limit_nano / 1e9)
        self._changes.clear()

    def loadable(self, only_new: bool = False) -> list[Budget]:
        """The budgets `load` rebuilds: all, or only those a reload did not carry over."""
        return [b for b in self.budgets if not (only_new and b.name in self._carried)]

    def applicable(
        self,
        key: str,
        model: str,
        team: str | None = None,
        limits: tuple[tuple[str, int], ...] = (),
    ) -> tuple[Budget, ...]:
        """The budgets a request of `key` (of `team`, with its own `limits` of budgets for
        each key) for `model` counts on. Cached: a key's changed team or limits is
        another entry."""
        found = self._applicable.get((key, model, team, limits))
        if found is None:
            found = tuple(
                b
                for b in self.budgets
                if b.config.scope == "global"
                or (b.config.scope == "key" and b.config.target == key)
                or (b.config.scope == "model" and b.config.target == model)
                or (b.config.scope == "team" and team is not None and b.config.target == team)
            )
            for each in self.each:
                target = each.applies(key, model, team)
                if target is not None:
                    found += (self.share(each, target, limits),)
            self._applicable[(key, model, team, limits)] = found
        return found

    def share(
        self, each: EachBudget, target: str, limits: tuple[tuple[str, int], ...] = ()
    ) -> Budget:
        """`target`'s member of `each` at its key's own limit (`limits`) or the budget's.
        A changed limit empties the cache of `applicable`: an entry made under the key's
        earlier limits names the same member, and must not be found again as it was."""
        member = each.member_for(target)
        if set_limit(each, member, limits):
            self._applicable.clear()
        return member

    def team_budgets(self) -> dict[str, Budget]:
        return dict(self._teams)

    async def set_team_budgets(self, configs: dict[str, BudgetConfig], database: Database) -> None:
        """Install the teams' budgets. A budget whose period is unchanged keeps its spend
        and holds (a new limit applies to the next request); a new one (or one with a
        new period) starts from the ledger's spend before it is enforced."""
        current = self._teams
        if {n: b.config for n, b in current.items()} == configs:
            return
        chosen: dict[str, Budget] = {}
        fresh: list[Budget] = []
        now = time.time()
        for name, cfg in configs.items():
            kept = current.get(name)
            if kept is not None and (kept.config.period, kept.config.timezone) == (
                cfg.period,
                cfg.timezone,
            ):
                _update(kept, cfg)
                self.metrics.budget_limit.labels(name).set(kept.limit_nano / 1e9)
                chosen[name] = kept
                continue
            budget = Budget(name, cfg, int(cfg.limit_usd * 1_000_000_000))
            budget.start, budget.end = period_bounds(now, cfg.period, cfg.timezone)
            fresh.append(budget)
            chosen[name] = budget
        for budget in fresh:
            budget.spent_nano = await ledger_spend(database, budget)
            budget.announced = passed(budget)
            self.metrics.budget_limit.labels(budget.name).set(budget.limit_nano / 1e9)
            self.metrics.budget_spent.labels(budget.name).set(budget.spent_nano / 1e9)
        current = self._teams  # what is installed now (a concurrent call may have run)
        for budget in fresh:
            replaced = current.get(budget.name)  # the same team and period, another zone
            if replaced is not None and replaced is not budget:
                _succeed(replaced, budget)
        self._teams = chosen
        self.budgets = [b for b in self.budgets if b.name not in current] + list(chosen.values())
        self._carried = (self._carried - set(current)) | set(chosen)
        self._applicable.clear()
        for name in set(current) - set(chosen):
            for gauge in (self.metrics.budget_spent, self.metrics.budget_limit):
                remove_series(gauge, name)  # also from a worker's metric file

    def reserve(self, budgets: tuple[Budget, ...], worst: WorstCase) -> Reservation:
        """Hold the worst case on every budget, or refuse with 429 if a hard one would pass."""
        if not budgets:
            return _NONE
        self.roll(budgets)
        worst_nano = worst.nano
        for budget in budgets:
            if budget.config.hard and (
                budget.spent_nano + budget.reserved_nano + worst_nano > budget.limit_nano
            ):
                raise exhausted(budget, worst, budget.spent_nano, budget.reserved_nano)
        for budget in budgets:
            budget.reserved_nano += worst_nano
        return Reservation(budgets, worst_nano)

    def settle(self, reservation: Reservation, actual_nano: int, at: float) -> None:
        """Replace a reservation by what the request really cost, counted in the period
        its ledger row is dated in (`at`): a request in flight when its period ends is
        spend of the next one, where the ledger (and so a restart) counts it. A budget a
        reload rebuilt while the request ran is settled on what it was rebuilt as, which
        holds what it held (and read its spend from the ledger before this request's row
        was there)."""
        for budget in reservation.budgets:
            budget.reserved_nano -= reservation.amount_nano
            while budget.successor is not None:
                budget = budget.successor
                budget.reserved_nano -= reservation.amount_nano
            if at >= budget.end:
                self._roll_over(budget, at)
            elif at < budget.start:  # dated in a period that another request ended
                continue
            budget.spent_nano += actual_nano
            self._show_spent(budget)
            self._announce_crossings(budget)

    def observe(self, budget: Budget, spent_nano: int, claimed: set[int] | None = None) -> None:
        """Take the fleet's spend (read back from Redis after a settle) as this budget's.

        `claimed`: the thresholds this process won the right to announce; the others
        the new spend crosses were (or will be) announced by another process."""
        budget.spent_nano = spent_nano
        self._show_spent(budget)
        if claimed is None:
            self._announce_crossings(budget)
            return
        for percent in budget.config.alert_at_percent:
            if percent in claimed:
                self._announce(budget, percent)
            elif spent_nano * 100 >= budget.limit_nano * percent:
                budget.announced.add(percent)

    def show(self, budget: Budget, spent_nano: int) -> None:
        """Take the host's spend (`budgets.host`) as this budget's, no threshold crossed."""
        budget.spent_nano = spent_nano
        self._show_spent(budget)

    def roll(self, budgets: Sequence[Budget], now: float | None = None) -> None:
        """Start a new period on every budget whose period has ended (by `now`)."""
        if now is None:
            now = time.time()
        for budget in budgets:
            if now >= budget.end:
                self._roll_over(budget, now)

    def _roll_over(self, budget: Budget, now: float) -> None:
        budget.start, budget.end = period_bounds(now, budget.config.period, budget.config.timezone)
        budget.spent_nano = 0
        budget.unsynced = []
        budget.announced.clear()
        if not budget.member:
            self.metrics.budget_spent.labels(budget.name).set(0)
        log.info("budget %s: new period from %s", budget.name, iso(budget.start))

    def _show_spent(self, budget: Budget) -> None:
        """Per request: the gauge's value is looked up once (`labels()` costs a lock and a
        tuple per call). A member of an `EachBudget` has none."""
        if budget.member:
            return
        gauge = budget.spent_gauge
        if gauge is None:
            child = self.metrics.budget_spent.labels(budget.name)
            gauge = budget.spent_gauge = value_of(child)
        gauge.set(budget.spent_nano / 1e9)

    def _announce_crossings(self, budget: Budget) -> None:
        for percent in budget.config.alert_at_percent:
            if percent in budget.announced:
                continue
            if budget.spent_nano * 100 < budget.limit_nano * percent:
                break
            self._announce(budget, percent)

    def _announce(self, budget: Budget, percent: int) -> None:
        """Log, count and (when configured) post one threshold crossing, once."""
        if percent in budget.announced:
            return
        budget.announced.add(percent)
        spent, limit = budget.spent_nano / 1e9, budget.limit_nano / 1e9
        text = (
            f"metergate budget {budget.name!r} ({budget.describe()}) passed {percent}%: "
            f"${usd(budget.spent_nano)} of ${usd(budget.limit_nano)}, period resets "
            f"{iso(budget.end)}"
        )
        log.warning(text)
        self.metrics.budget_alerts.labels(budget.name, str(percent)).inc()
        if budget.config.webhook_url:
            self.notifier.send(
                budget.config.webhook_url,
                text,
                {
                    "budget": budget.name,
                    **({budget.config.scope: budget.target} if budget.member else {}),
                    "percent": percent,
                    "spent_usd": spent,
                    "limit_usd": limit,
                    "resets_at": iso(budget.end),
                },
            )

    async def close(self) -> None:
        await self.notifier.close()


def usd(nano: int) -> str:
    """Dollars for a person to read: cents, and the digits below them (up to a
    micro-dollar) that a small budget needs ("0.002", not "0.00")."""
    text = f"{nano / 1e9:.6f}".rstrip("0")
    return text + "0" * (2 - len(text.partition(".")[2]))


def _same_spend(old: BudgetConfig, new: BudgetConfig) -> bool:
    """Whether a changed budget still counts the same requests over the same period:
    then it keeps its object, so its spend and the holds of requests in flight stay
    (rebuilt from the ledger, it would miss what those requests are about to spend)."""
    return (old.scope, old.target, old.period, old.timezone) == (
        new.scope,
        new.target,
        new.period,
        new.timezone,
    )


def _succeed(replaced: Budget, budget: Budget) -> None:
    """`budget` counts the requests `replaced` did (another period or time zone): it
    holds what the requests in flight hold there, and they settle on it."""
    budget.reserved_nano += replaced.reserved_nano
    replaced.successor = budget


def _update(budget: Budget, config: BudgetConfig) -> None:
    """Apply a changed limit, hardness or thresholds to a budget in use. A threshold no
    longer reached at the new limit may be announced again when it is."""
    budget.config, budget.limit_nano = config, int(config.limit_usd * 1_000_000_000)
    budget.announced = {
        p for p in budget.announced if budget.spent_nano * 100 >= budget.limit_nano * p
    }


def exhausted(budget: Budget, worst: WorstCase, spent_nano: int, held_nano: int) -> BudgetExceeded:
    """The 429 for a hard budget that `worst` more would pass (same text whether the
    numbers are this process's or the fleet's), saying what would fit."""
    spent, limit = spent_nano / 1e9, budget.limit_nano / 1e9
    left = max(0, budget.limit_nano - spent_nano - held_nano)
    message = (
        f"budget {budget.name!r} ({budget.describe()}) would be exceeded: limit ${limit:.6f}, "
        f"spent ${spent:.6f}, held by requests in flight ${held_nano / 1e9:.6f}, this request "
        f"may cost up to ${worst.nano / 1e9:.6f}"
    )
    if worst.assumed:
        message += (
            f" (it sent no {worst.limit_field}, so the gateway bounds its answer at the "
            f"model's budget_max_tokens, {worst.max_tokens})"
        )
    fits = worst.fitting_max_tokens(left) if worst.max_tokens else 0
    if not left:
        message += "; nothing of it is left"
    elif fits:
        message += f"; send {worst.limit_field} of at most {fits} to fit the ${left / 1e9:.6f} left"
    elif worst.searches_pico and worst.fixed_pico > left * 1000:
        message += (
            f"; the prompt and up to {worst.web_searches} web searches may cost up to "
            f"${worst.fixed_pico / 1e12:.6f}, more than the ${left / 1e9:.6f} left: shorten "
            "the prompt or lower the search tool's max_uses"
        )
    elif worst.prompt_pico > left * 1000:
        message += (
            f"; the prompt alone may cost up to ${worst.prompt_pico / 1e12:.6f}, more than "
            f"the ${left / 1e9:.6f} left: shorten it"
        )
    elif worst.max_tokens:
        message += (
            f"; of the ${left / 1e9:.6f} left, the prompt may take up to "
            f"${worst.prompt_pico / 1e12:.6f} and the rest does not pay for one output token"
        )
    if spent_nano + worst.nano <= budget.limit_nano:
        # Refused for what requests in flight hold: it may fit as soon as they end.
        message += "; requests in flight hold the rest until they end: retry in a moment"
        return BudgetExceeded(message, retry_after=1)
    message += f"; the budget resets at {iso(budget.end)}"
    return BudgetExceeded(message, retry_after=max(1, int(budget.end - time.time())))
