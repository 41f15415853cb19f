"""Budgets and rate limits on Redis: one script call admits a request, one settles it.

Admission checks every rate limit and every hard budget and, only if all pass, takes
the request from the request buckets and holds its worst-case cost on every budget
(`scripts.ADMIT`). Settling releases the hold, adds the real cost and debits the token
buckets (`scripts.SETTLE`); it runs off the response path.

This process also tracks what it holds on each budget (`holding`): after an outage it
tells Redis exactly that (`scripts.SYNC`), whatever calls were lost on the way, and it
keeps spend settled during the outage (`Budget.unsynced`, dated like its ledger rows)
to add then, except what the ledger already gives a counter seeded meanwhile (`_sync`).
A settle Redis did not answer may still have run (a stalled Redis runs it on resuming):
its spend waits (`_doubts`) until the recovery's fence says whether it ran
(`scripts.FENCE`), and is added only if it did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from metergate.budgets.book import BudgetBook, Reservation, exhausted
from metergate.budgets.budget import Budget
from metergate.limits.admission import Admission
from metergate.limits.rate import Bucket, Verdict, rate_limited, ratelimit_headers
from metergate.metering.estimate import WorstCase
from metergate.shared import scripts
from metergate.shared.errors import Unavailable
from metergate.shared.redis import RedisLink

log = logging.getLogger("metergate.redis")


@dataclass(frozen=True, slots=True)
class _Doubt:
    """A settle sent and not answered: Redis may have run it, or not."""

    number: int
    budgets: tuple[Budget, ...]
    crossed: list[bool]  # held in a period that ended: its cost was not in the call
    cost_nano: int
    at: float
    carried: list[list[tuple[int, int]]]  # outage spend the call carried, per budget


@dataclass(frozen=True, slots=True)
class BudgetKeys:
    """The Redis keys of one budget in one period (see `scripts` for the layout)."""

    spent: str
    held: str
    alerts: str
    seed: str
    expire_at: int  # a day after the period ends
    start: float  # the period's start


class SharedCounters:
    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.holding: dict[str, int] = {}  # held key -> nano-USD this process holds there
        # the ledger's sum for a budget of rows dated before a time, once this process's
        # rows appended so far are committed
        self.spend_of: Callable[[Budget, float], Awaitable[int]] | None = None
        self._cuts: dict[str, float] = {}  # spent key -> its cut, once synced with it
        # (name, scope, target) -> the keys of its current period: one entry per budget
        # (and per key of a budget for each key), however many periods pass
        self._keys: dict[tuple[str, str, str | None], BudgetKeys] = {}
        self._rate_specs: dict[tuple[Bucket, ...], tuple[list[str], str]] = {}
        self._seeding: dict[str, asyncio.Task[None]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        # members of budgets for each key whose Redis counters an outage may have left
        # behind (a settle or admission that failed): `resync` syncs them with the rest
        self._unshared: set[Budget] = set()
        self._doubts: list[_Doubt] = []

    def keys(self, budget: Budget) -> BudgetKeys:
        ident = (budget.name, budget.config.scope, budget.target)
        found = self._keys.get(ident)
        if found is None or found.start != budget.start:
            if found is not None:
                self._cuts.pop(found.spent, None)  # a past period's
            base = self._base(budget)
            found = self._keys[ident] = BudgetKeys(
                f"{base}:spent",
                f"{base}:held",
                f"{base}:alerts",
                f"{base}:seed",
                int(budget.end) + 86_400,
                budget.start,
            )
        return found

    def _base(self, budget: Budget) -> str:
        scope = f"{budget.config.scope}={budget.target or '*'}"
        return f"{self.link.prefix}budget:{budget.name}:{scope}:{int(budget.start)}"

    async def held_nano(self, budgets: Sequence[Budget]) -> list[int]:
        """What the fleet's live processes hold on each budget now (for the console), in
        one round trip; this process's own when Redis cannot be asked. Reads no cached
        keys, so a budget made up for the question changes nothing."""
        if not budgets:
            return []
        keys = [f"{self._base(budget)}:held" for budget in budgets]
        if self.link.up:
            with contextlib.suppress(Unavailable):
                reply = await self.link.call(self.link.held, keys, [self.link.live_prefix])
                return [int(held) for held in reply]
        return [
            self.holding.get(key, 0) + budget.reserved_nano
            for key, budget in zip(keys, budgets, strict=True)
        ]

    async def admit(
        self, buckets: tuple[Bucket, ...], budgets: tuple[Budget, ...], worst: WorstCase
    ) -> Admission:
        """One round trip (plus a ledger seed when a budget's counter is missing)."""
        worst_nano = worst.nano
        keys = tuple(self.keys(b) for b in budgets)
        rate_keys, rate_spec = self._rate_spec(buckets)
        redis_keys = [*rate_keys, *(name for k in keys for name in (k.spent, k.held))]
        budget_spec = " ".join(
            f"{b.limit_nano} {int(b.config.hard)} {k.expire_at}"
            for b, k in zip(budgets, keys, strict=True)
        )
        args = [self.link.holder, self.link.live_prefix, worst_nano, rate_spec, budget_spec]
        args += (self.link.fence_key, 0)
        for _ in range(3):
            if not self.link.up:
                raise Unavailable("redis went down during admission")
            args[-1] = self.link.number()
            call = self.link.submit(self.link.admit, redis_keys, args)
            try:
                reply = [int(n) for n in (await asyncio.shield(call)).split()]
            except asyncio.CancelledError:  # the caller left: release what it may still get
                call.add_done_callback(lambda done: self._release(done, budgets, keys, worst_nano))
                raise
            except Unavailable:  # it may have held there: the resync after the outage knows
                self._unshared.update(b for b in budgets if b.member)
                raise
            code, index = reply[0], reply[1] - 1
            if code == scripts.FENCED:  # (only a late call is: this one is not)
                raise Unavailable("redis fenced off an admission")
            if code == scripts.NEEDS_SEED:
                await self.seed([budgets[i - 1] for i in reply[4:]])
                continue
            states = reply[4:]
            verdicts = [
                Verdict(True, 0, states[2 * i], states[2 * i + 1]) for i in range(len(buckets))
            ]
            headers = ratelimit_headers(buckets, verdicts)
            if code == scripts.RATE_LIMITED:
                refused = Verdict(False, 0, 0, verdicts[index].reset_us, reply[2])
                raise rate_limited(buckets[index], refused, headers)
            if code == scripts.OVER_BUDGET:
                raise exhausted(budgets[index], worst, reply[2], reply[3])
            if worst_nano > 0:
                for k in keys:
                    self.holding[k.held] = self.holding.get(k.held, 0) + worst_nano
            return Admission(buckets, Reservation(budgets, worst_nano), headers, keys)
        raise Unavailable("budget counters keep disappearing from redis (evicted?)")

    def _rate_spec(self, buckets: tuple[Bucket, ...]) -> tuple[list[str], str]:
        """The buckets' Redis keys and their "kind interval window" triples (cached:
        fewer, prebuilt arguments are most of what a script call costs in redis-py)."""
        found = self._rate_specs.get(buckets)
        if found is None:
            keys = [f"{self.link.prefix}rate:{b.state_key}" for b in buckets]
            spec = " ".join(
                f"{'r' if b.kind == 'requests' else 't'} {b.interval_us!r} {b.window_us!r}"
                for b in buckets
            )
            found = self._rate_specs[buckets] = (keys, spec)
        return found

    async def seed(self, budgets: Sequence[Budget]) -> None:
        """Create missing spend counters from the ledger (SET NX: the first process wins).
        One ledger query per counter at a time, however many requests are waiting."""
        waits = []
        for budget in budgets:
            name = self.keys(budget).spent
            task = self._seeding.get(name)
            if task is None:
                task = asyncio.create_task(self._seed_one(budget))
                self._seeding[name] = task
                task.add_done_callback(functools.partial(self._seeded, name))
            waits.append(asyncio.shield(task))
        await asyncio.gather(*waits)

    def _seeded(self, name: str, _: asyncio.Task[None]) -> None:
        self._seeding.pop(name, None)

    async def _seed_one(self, budget: Budget) -> None:
        try:
            await self._sync([budget], hold=False)
        except Unavailable:
            raise
        except Exception as error:  # the ledger is down: degrade like Redis being down
            message = f"cannot seed budget {budget.name!r} from the ledger: {error}"
            raise Unavailable(message) from error
        log.info("budget %s: shared counter seeded from the ledger", budget.name)

    async def resync(self, book: BudgetBook) -> None:
        """After an outage (and at start): seed missing counters from the ledger, add what
        was settled here meanwhile that they lack, and set this process's holds to
        exactly what it holds. Runs while the link is down."""
        await self._fence()
        unshared, self._unshared = self._unshared, set()
        members = (  # of budgets for each key: only those the outage may have touched
            m for m in book.members() if m in unshared or self._holds(m)
        )
        budgets = (*book.budgets, *members)
        book.roll(budgets)
        try:
            synced = await self._sync(budgets, hold=True)
        except BaseException:
            self._unshared |= unshared
            raise
        for budget, spent in zip(budgets, synced, strict=True):
            book.observe(budget, spent, claimed=set())

    async def _fence(self) -> None:
        """Fence off this process's calls sent before the outage that Redis may run yet,
        and count the spend of the unanswered settles it did not run (`_doubts`)."""
        reply = await self.link.call(
            self.link.fence, [self.link.fence_key], [self.link.last_number], recovery=True
        )
        ran = int(reply)
        doubts, self._doubts = self._doubts, []
        for doubt in doubts:
            for budget, crossed, carried in zip(
                doubt.budgets, doubt.crossed, doubt.carried, strict=True
            ):
                if doubt.number > ran:  # it did not run: all it carried is still owed
                    budget.unsynced += carried
                    _keep_dated(budget.unsynced, doubt.at, doubt.cost_nano)
                elif crossed:  # it ran without the cost, owed to the new period's counter
                    _keep_dated(budget.unsynced, doubt.at, doubt.cost_nano)

    def _holds(self, member: Budget) -> bool:
        """Whether this process holds anything on a member's counter (its keys were made
        when it was held: members never held make none here)."""
        found = self._keys.get((member.name, member.config.scope, member.target))
        return found is not None and self.holding.get(found.held, 0) > 0

    async def _sync(
        self, budgets: Sequence[Budget], hold: bool, cut: float | None = None
    ) -> list[int]:
        """Make each budget's counter count this process's spend exactly once; return the
        counters.

        A counter counts the ledger's rows dated before its cut plus the spend dated from
        the cut on, added by the process that settled it (`scripts.SYNC`). Another
        process may have seeded the counter from rows this one wrote during an outage, so
        of the spend kept here only what is dated from the cut on is added; the rest is
        in the ledger, read here after this process's rows before the cut are committed.
        The cut is this call's time when it seeds the counter, else the counter's (Redis
        tells it: then the ledger is read again, before that cut). `cut`: the cut to seed
        a missing counter with instead (a request's past slot, `_straddled`).
        """
        assert self.spend_of is not None
        # budget index -> the cut to sync with: this call's time, should the counter be missing
        cuts = dict.fromkeys(range(len(budgets)), _next_slot(time.time()) if cut is None else cut)
        spent: dict[int, int] = {}
        for _ in range(3):
            if not cuts:
                break
            # Rows this process writes from here on are dated from every cut on (a cut
            # taken on another host may be ahead of this host's clock).
            while (ahead := max(cuts.values()) - time.time()) > 0:  # noqa: ASYNC110 (wall clock)
                await asyncio.sleep(ahead)
            todo = list(cuts)
            ledger = [await self.spend_of(budgets[i], cuts[i]) for i in todo]
            kept = {i: budgets[i].unsynced for i in todo}
            for i in todo:
                budgets[i].unsynced = []
            keys: list[str] = []
            args: list[Any] = [self.link.holder]
            for i, before in zip(todo, ledger, strict=True):
                budget, k, cut = budgets[i], self.keys(budgets[i]), cuts[i]
                held = self.holding.get(k.held, 0) if hold else -1
                keys += (k.spent, k.held, k.alerts, k.seed)
                args += (repr(cut), before, _dated_from(cut, kept[i]), held, k.expire_at)
                args += (budget.limit_nano, _percents(budget))
            try:
                reply = await self.link.call(self.link.sync, keys, args, recovery=True)
            except BaseException:
                for i in todo:
                    budgets[i].unsynced += kept[i]
                raise
            for n, i in enumerate(todo):
                cut = float(reply[2 * n + 1])
                if cut != cuts[i]:  # seeded with another cut: nothing was counted
                    budgets[i].unsynced += kept[i]
                    cuts[i] = cut
                    continue
                self._cuts[self.keys(budgets[i]).spent] = cut
                spent[i] = reply[2 * n]
                del cuts[i]
        if cuts:
            raise Unavailable("budget counters keep being seeded anew in redis")
        return [spent[i] for i in range(len(budgets))]

    def settle(
        self, book: BudgetBook, admission: Admission, cost_nano: int, tokens: int, at: float
    ) -> None:
        """Release this process's holds now; tell Redis off the response path. `at`: the
        time the request's ledger row is dated."""
        if admission.keys is not None:
            amount = admission.reservation.amount_nano
            for k in admission.keys:
                left = self.holding.get(k.held, 0) - amount
                if left > 0:
                    self.holding[k.held] = left
                else:
                    self.holding.pop(k.held, None)
        book.roll(admission.reservation.budgets, at)  # a period that ended meanwhile
        if not self.link.up:
            self._keep(book, admission, cost_nano, at)
            return
        task = asyncio.create_task(self._settle(book, admission, cost_nano, tokens, at))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, book: BudgetBook, admission: Admission, cost_nano: int, tokens: int, at: float
    ) -> None:
        budgets = admission.reservation.budgets
        token_buckets = [b for b in admission.buckets if b.kind == "tokens"] if tokens else []
        if not budgets and not token_buckets:
            return
        held_here = admission.keys is not None
        keys = (
            admission.keys if admission.keys is not None else tuple(self.keys(b) for b in budgets)
        )
        amount = admission.reservation.amount_nano if held_here else 0
        # Held in a period that has ended since: the hold goes, the cost is the new one's.
        crossed = [at >= b.start > k.start for b, k in zip(budgets, keys, strict=True)]
        carried = [b.unsynced for b in budgets]  # left from an outage: what Redis lacks goes
        for b in budgets:
            b.unsynced = []
        if self.link.up:
            costs = [
                (0 if later else cost_nano) + _dated_from(self._cuts.get(k.spent, 0.0), kept)
                for later, k, kept in zip(crossed, keys, carried, strict=True)
            ]
            redis_keys, args = self._settle_call(
                budgets, keys, amount, costs, token_buckets, tokens
            )
            try:
                reply = await self.link.call(self.link.settle, redis_keys, args)
            except Unavailable as error:
                if error.uncertain:  # it may have run: the recovery's fence will say
                    doubt = _Doubt(args[-1], budgets, crossed, cost_nano, at, carried)
                    self._doubts.append(doubt)
                    self._keep(book, admission, cost_nano, at, owed=False)
                    return
                reply = None  # it did not run
            if reply:  # (empty: fenced, which only a late call is; as if it did not run)
                for i, (budget, k) in enumerate(zip(budgets, keys, strict=True)):
                    spent, claimed = reply[2 * i], reply[2 * i + 1]
                    # -1: evicted, the next admission re-seeds it; a past period's key
                    # says nothing of this one; and replies may arrive out of order.
                    if spent >= 0 and k == self.keys(budget):
                        percents = budget.config.alert_at_percent
                        won = {p for bit, p in enumerate(percents) if claimed >> bit & 1}
                        book.observe(budget, max(spent, budget.spent_nano), won)
                if any(crossed):
                    straddled = [b for b, later in zip(budgets, crossed, strict=True) if later]
                    await self._straddled(book, straddled, cost_nano, at)
                return
        for budget, kept in zip(budgets, carried, strict=True):
            budget.unsynced += kept
        self._keep(book, admission, cost_nano, at)

    async def _straddled(
        self, book: BudgetBook, budgets: list[Budget], cost_nano: int, at: float
    ) -> None:
        """Count a request held in a period that ended while it ran on the new period's
        counter, where its ledger row is dated. That counter may not exist yet, or may
        have been seeded from the ledger just now, maybe with this row: a sync counts the
        cost exactly once either way. A missing counter is seeded with a cut at the row's
        slot, so that the row is among the spend added here, not read from the ledger.
        (Seeded by another request after `at`, it relies on the row being read: this
        process's rows are written before it reads, unless the answer is still being
        sent then.) Periods end rarely, so the sync's ledger read is affordable."""
        for budget in budgets:
            _keep_dated(budget.unsynced, at, cost_nano)
        try:
            counted = await self._sync(budgets, hold=False, cut=_slot_start(at))
        except Exception as error:  # Redis or the ledger failed: the next settle shares it
            log.warning("budget spend across a period's end not yet shared: %s", error)
            return
        for budget, spent in zip(budgets, counted, strict=True):
            book.observe(budget, spent, claimed=set())

    def _settle_call(
        self,
        budgets: tuple[Budget, ...],
        keys: tuple[BudgetKeys, ...],
        amount: int,
        costs: list[int],
        token_buckets: list[Bucket],
        tokens: int,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `scripts.SETTLE`."""
        redis_keys = [f"{self.link.prefix}rate:{b.state_key}" for b in token_buckets]
        redis_keys += (name for k in keys for name in (k.spent, k.held, k.alerts))
        intervals = " ".join(repr(b.interval_us) for b in token_buckets)
        spec = " ".join(
            f"{amount} {cost} {k.expire_at} {b.limit_nano} {_percents(b) or '-'}"
            for b, k, cost in zip(budgets, keys, costs, strict=True)
        )
        fence = (self.link.fence_key, self.link.number())  # numbered as it is sent
        return redis_keys, [self.link.holder, tokens, intervals, spec, *fence]

    def _release(
        self,
        admitted: asyncio.Future[Any],
        budgets: tuple[Budget, ...],
        keys: tuple[BudgetKeys, ...],
        worst_nano: int,
    ) -> None:
        """Undo the hold of an admission whose caller went away before its answer."""
        if admitted.cancelled() or admitted.exception() is not None:
            return
        if int(admitted.result().split()[0]) != scripts.ADMITTED or not keys or worst_nano <= 0:
            return
        zero = [0] * len(budgets)
        call = self.link.submit(
            self.link.settle, *self._settle_call(budgets, keys, worst_nano, zero, [], 0)
        )
        call.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _keep(
        self, book: BudgetBook, admission: Admission, cost_nano: int, at: float, owed: bool = True
    ) -> None:
        """Redis is unreachable: count the cost here, and share it after the outage
        (`owed` False: the fence decides whether it is owed, `_fence`)."""
        for budget in admission.reservation.budgets:
            if budget.member:
                self._unshared.add(budget)
            if cost_nano and owed:
                _keep_dated(budget.unsynced, at, cost_nano)
            if admission.keys is not None:  # held on Redis: not yet in the book's spend
                book.observe(budget, budget.spent_nano + cost_nano)

    async def drain(self) -> None:
        """Wait (a few seconds at most) for settles still on their way to Redis."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=5.0)


# Spend kept through an outage is dated by the tenth of a second (its slot), and cuts
# fall on slot boundaries: a long outage under load keeps at most ten entries a second
# per budget (36,000 an hour), not one per request, and a cut never splits an entry.
_SLOTS_PER_SECOND = 10


def _next_slot(now: float) -> float:
    """A cut: the first slot boundary from `now` on."""
    return math.ceil(now * _SLOTS_PER_SECOND) / _SLOTS_PER_SECOND


def _slot_start(at: float) -> float:
    """A cut: the start of the slot `at` falls in (spend dated `at` is from it on)."""
    return int(at * _SLOTS_PER_SECOND) / _SLOTS_PER_SECOND


def _keep_dated(kept: list[tuple[int, int]], at: float, cost_nano: int) -> None:
    """Add spend whose ledger row is dated `at`, into the last entry when in its slot."""
    slot = int(at * _SLOTS_PER_SECOND)
    if kept and kept[-1][0] == slot:
        kept[-1] = (slot, kept[-1][1] + cost_nano)
    else:
        kept.append((slot, cost_nano))


def _dated_from(cut: float, kept: list[tuple[int, int]]) -> int:
    """What of the spend kept here a counter with this cut lacks (the rest is in the
    ledger rows dated before the cut, which it counts)."""
    first = round(cut * _SLOTS_PER_SECOND)
    return sum(nano for slot, nano in kept if slot >= first)


def _percents(budget: Budget) -> str:
    return ",".join(str(p) for p in budget.config.alert_at_percent)
