"""Admission: a request's rate limits and budgets, checked and taken in one step.

Rate limits are checked first, then hard budgets; only when every one passes is
anything taken (a request from each request bucket, a hold on each budget), so a
refused request costs nothing. Without Redis this is the in-process rate limiter and
budget book, with no `await` between check and take; the workers of `serve --workers N`
keep both in tables they share (`limits.host`, `budgets.host`), under one lock held from
check to take (none for soft budgets alone, which refuse nothing). With Redis it is one script call
(`metergate.shared.counters`); when Redis is unreachable, `redis.on_failure` decides:
`open` falls back to this process's counters, `closed` refuses with a 503.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from metergate.budgets.book import BudgetBook, Reservation
from metergate.budgets.budget import Budget
from metergate.errors import GatewayLimit
from metergate.limits.rate import Bucket, RateLimiter, ratelimit_headers
from metergate.metering.estimate import WorstCase
from metergate.providers.base import Usage
from metergate.shared.errors import Unavailable

if TYPE_CHECKING:
    from metergate.budgets.host import HostBudgets
    from metergate.shared.counters import BudgetKeys, SharedCounters


@dataclass(slots=True, eq=False)
class Admission:
    """What an admitted request took, to be settled when it ends."""

    buckets: tuple[Bucket, ...]
    reservation: Reservation
    headers: list[tuple[bytes, bytes]]  # x-ratelimit-*, on every response of a limited request
    keys: tuple[BudgetKeys, ...] | None = None  # the budgets' Redis keys, when held there


NOTHING = Admission((), Reservation((), 0), [])


class Gate:
    """Admits requests against one config's rate limits and budgets, and settles them."""

    def __init__(
        self,
        budgets: BudgetBook,
        rates: RateLimiter,
        shared: SharedCounters | None,
        host: HostBudgets | None = None,
    ) -> None:
        """`host`: the budgets the workers of this host share (none with Redis); its
        admission lock is the rate limiter's."""
        self.budgets = budgets
        self.rates = rates
        self.shared = shared
        self.host = host

    async def held_nano(self, budgets: Sequence[Budget]) -> list[int]:
        """What requests in flight hold on each budget now, wherever they are held: in
        the fleet's Redis, the host's table, or this process."""
        if self.shared is not None:
            return await self.shared.held_nano(budgets)
        if self.host is not None:
            return [self.host.held_nano(budget) for budget in budgets]
        return [budget.reserved_nano for budget in budgets]

    async def admit(
        self,
        key: str,
        model: str,
        budgets: tuple[Budget, ...],
        worst: WorstCase,
        team: str | None = None,
        own_rates: tuple[int | None, int | None] | None = None,
    ) -> Admission:
        """Take the request from its rate limits (its key's, model's and team's) and hold
        its worst case on its budgets, or raise the 429 (or, degraded and closed, the 503)
        that refuses it. `own_rates`: the key's own rpm and tpm, if it has any."""
        rates = self.rates
        buckets = rates.applicable(key, model, team, own_rates) if rates or own_rates else ()
        if not buckets and not budgets:
            return NOTHING
        shared = self.shared
        if shared is not None:
            if shared.link.up:
                self.budgets.roll(budgets)
                with contextlib.suppress(Unavailable):
                    return await shared.admit(buckets, budgets, worst)
            if shared.link.config.on_failure == "closed":
                raise unavailable(shared.link.where)
        return self._admit_here(buckets, budgets, worst)

    def _admit_here(
        self, buckets: tuple[Bucket, ...], budgets: tuple[Budget, ...], worst: WorstCase
    ) -> Admission:
        host = self.host
        if not buckets:  # budgets only
            if host is None:
                return Admission(buckets, self.budgets.reserve(budgets, worst), [])
            if not host.needs_lock(budgets):  # soft ones: nothing to check
                return Admission(buckets, host.reserve(self.budgets, budgets, worst), [])
            with host.lock:
                return Admission(buckets, host.reserve(self.budgets, budgets, worst), [])
        rates = self.rates
        with rates.lock:  # no other worker of the host between check and take
            verdicts = rates.check(buckets, _now_us())
            if host is None:
                reservation = self.budgets.reserve(budgets, worst)
            else:
                reservation = host.reserve(self.budgets, budgets, worst)
            rates.take(buckets, verdicts)
        return Admission(buckets, reservation, ratelimit_headers(buckets, verdicts))

    def settle(self, admission: Admission, cost_nano: int, usage: Usage | None, at: float) -> None:
        """Replace the hold by the real cost and charge the tokens used (never awaits:
        the Redis part runs off the response path). `at`: the time the request's ledger
        row is dated (`RequestLog.ended`)."""
        if admission is NOTHING:
            return
        tokens = (
            0
            if usage is None
            else (usage.input_tokens + usage.cached_input_tokens + usage.output_tokens)
        )
        if admission.buckets:
            with self.rates.lock:
                self.rates.debit(admission.buckets, tokens, _now_us())
        host = self.host
        if host is not None and admission.reservation.slots:  # held on the host's table
            host.show(self.budgets, host.settle(self.budgets, admission.reservation, cost_nano, at))
        elif admission.keys is None:
            self.budgets.settle(admission.reservation, cost_nano, at)
        if self.shared is not None:
            self.shared.settle(self.budgets, admission, cost_nano, tokens, at)


def unavailable(where: str) -> GatewayLimit:
    """The gateway's own dependency failed: an error, but never the upstream's."""
    return GatewayLimit(
        f"shared state unavailable: Redis at {where} is unreachable, and this gateway "
        "refuses requests under budgets or rate limits until it is back "
        "(redis.on_failure: closed); retry shortly",
        code="shared_state_unavailable",
        retry_after=1,
    )


def _now_us() -> float:
    return time.monotonic_ns() / 1000
