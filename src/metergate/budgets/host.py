"""Budget spend and holds shared by the workers of one host (`serve --workers N`
without Redis).

Each worker used to count only its own spend, so N workers could each spend a hard
budget's whole limit. The workers now keep every budget's state in one file they all
map, beside the rate-limit table (`limits.host`), read and written only under that
table's lock. A slot holds, for one budget (or one key's member of a budget for each
key) in one period:

- its spend in nano-USD, seeded by the first worker to use it from what that worker
  read from the ledger (no worker had spent on it then), and counted here from then on;
- what each worker's requests in flight hold, one column per worker: a worker that
  dies is replaced in its column, and the supervisor zeroes that column first
  (`release_worker`), so holds never outlive their requests;
- the highest alert threshold announced, so each crossing is announced by one worker.

A worker checks a hard budget against the spend and every worker's holds, holds the
worst case in its column, and on settling moves it to the spend, all under the lock:
N workers admit a limit once. A slot is named by a hash of the budget's name, target,
period and its start, so a new period (or a reload that changes the period) starts a
new slot; a slot whose period ended a day ago, holding nothing, is taken for another.
A full table keeps further budgets in each worker's memory and says so once.

Bounds: a budget new in a reload misses what workers still on the old config spend in
the seconds (≤ 2 s) before they follow it; a worker killed while it settles a request
may have added its cost to some of the request's budgets and not yet to the others.
The ledger has both, and a restart counts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import time
from pathlib import Path

from metergate.budgets.book import BudgetBook, Reservation, exhausted
from metergate.budgets.budget import Budget, passed
from metergate.metering.estimate import WorstCase

log = logging.getLogger("metergate.budgets")
Seen = tuple[Budget, int, set[int]]  # a budget, its spend now, thresholds to announce

BUDGETS_FILE = "budgets"  # in the directory of the host's tables, beside the rate limits
CAPACITY = 1 << 14  # budgets, and members of budgets for each key, in live periods
REUSE_AFTER = 86_400  # seconds past a slot's period end before it may be taken
_MAGIC = int.from_bytes(b"mgbudg02", "little")
# The file is signed 64-bit words: a header (magic, capacity, workers), then the slots:
_HASH, _SPENT, _ANNOUNCED, _END, _HELD = range(5)  # the name's hash (0: free), nano-USD
# spent, the highest threshold announced, the period's end (epoch s), then each
# worker's holds: 4 + workers words
_HEADER = 3


def create_table(path: Path, workers: int, capacity: int = CAPACITY) -> None:
    """Make the zeroed file (the supervisor does, before any worker opens it)."""
    with path.open("wb") as file:
        for word in (_MAGIC, capacity, workers):
            file.write(word.to_bytes(8, "little", signed=True))
        file.truncate(8 * (_HEADER + capacity * (_HELD + workers)))


def release_worker(path: Path, worker: int, lock: contextlib.AbstractContextManager[None]) -> int:
    """Zero what `worker` holds on every budget (it died with requests in flight; its
    replacement starts in its column); the nano-USD let go."""
    table = HostBudgets(path, worker, lock)
    words, released = table._words, 0
    try:
        with lock:
            for at in range(_HEADER, len(words), table._slot):
                column = at + table._mine
                released += words[column]
                words[column] = 0
    finally:
        table.close()
    return released


class HostBudgets:
    """One worker's view of the table: `reserve` and `settle` are `BudgetBook.reserve`
    and `settle` on the host's counters. The caller holds `lock` around each (`Gate`
    takes it once for the rate limits and budgets together), and calls `show` after."""

    def __init__(self, path: Path, worker: int, lock: contextlib.AbstractContextManager[None]):
        self.lock = lock
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        self._words = memoryview(self._map).cast("q")  # a word read or written: ~30 ns
        magic, self.capacity, self.workers = self._words[:_HEADER]
        self._slot = _HELD + self.workers
        if magic != _MAGIC or len(self._words) != _HEADER + self.capacity * self._slot:
            self.close()
            raise ValueError(f"{path} is not a budget table")
        if not 0 <= worker < self.workers:
            self.close()
            raise ValueError(f"worker {worker} has no column in {path} ({self.workers})")
        self._mine = _HELD + worker  # this worker's column in a slot
        self._unplaced: set[tuple[str, str | None, float]] = set()
        self._told_full = False

    def reserve(
        self, book: BudgetBook, budgets: tuple[Budget, ...], worst: WorstCase
    ) -> Reservation:
        """Hold the worst case on every budget, or raise the 429 of a hard one it would
        pass, counting every worker's spend and holds. Call with `lock` held."""
        if not budgets:
            return Reservation((), 0)
        book.roll(budgets)
        worst_nano, words, width = worst.nano, self._words, self._slot
        slots: list[int | None] = []
        for budget in budgets:
            at = self._find(budget)
            slots.append(at)
            if at is None:  # the full table has no slot for it: this worker's counts
                spent, held = budget.spent_nano, budget.reserved_nano
            else:
                spent = budget.spent_nano = words[at + _SPENT]
                held = sum(words[at + _HELD : at + width])
            if budget.config.hard and spent + held + worst_nano > budget.limit_nano:
                raise exhausted(budget, worst, spent, held)
        mine = self._mine
        for budget, at in zip(budgets, slots, strict=True):
            budget.reserved_nano += worst_nano
            if at is not None:
                words[at + mine] += worst_nano
        return Reservation(budgets, worst_nano, tuple(slots))

    def settle(
        self, book: BudgetBook, reservation: Reservation, actual_nano: int, at: float
    ) -> list[Seen]:
        """Replace the holds by what the request cost, dated `at` as its ledger row (see
        `BudgetBook.settle`); what each budget's spend is now, for `show` once the
        lock is let go. Call with `lock` held."""
        words, mine, amount = self._words, self._mine, reservation.amount_nano
        seen: list[Seen] = []
        for budget, held_at in zip(reservation.budgets, reservation.slots, strict=True):
            budget.reserved_nano -= amount
            if held_at is not None:
                words[held_at + mine] -= amount
            if at >= budget.end:
                book.roll((budget,), at)
            elif at < budget.start:  # dated in a period another request ended
                continue
            slot = self._find(budget)
            if slot is None:
                budget.spent_nano += actual_nano
                seen.append((budget, budget.spent_nano, _crossed(budget, budget.spent_nano)))
                continue
            words[slot + _SPENT] += actual_nano
            spent = words[slot + _SPENT]
            seen.append((budget, spent, self._claim(slot, budget, spent)))
        return seen

    @staticmethod
    def show(book: BudgetBook, seen: list[Seen]) -> None:
        """Show the host's spend, and announce the thresholds this worker was first to
        see crossed (outside the lock: a webhook is queued, a line logged)."""
        for budget, spent, claimed in seen:
            if claimed:
                book.observe(budget, spent, claimed)
            else:
                book.show(budget, spent)

    def _claim(self, at: int, budget: Budget, spent: int) -> set[int]:
        """The thresholds `spent` crosses that no worker announced yet, now this one's.
        Under a raised limit the mark comes down, as `book._update` lets thresholds be
        announced again when they are reached again."""
        top, limit = 0, budget.limit_nano
        for percent in reversed(budget.config.alert_at_percent):  # sorted
            if spent * 100 >= limit * percent:
                top = percent
                break
        announced = self._words[at + _ANNOUNCED]
        if top == announced:
            return _NOTHING
        self._words[at + _ANNOUNCED] = top
        return {p for p in _crossed(budget, spent) if p > announced}

    def _find(self, budget: Budget) -> int | None:
        """The index of the budget's slot in its current period, made (seeded with the
        spend this worker knows) when no worker made it yet; None if the table is full."""
        words = self._words
        known = budget.host_slot
        if known is not None and known[0] == budget.start and words[known[1]] == known[2]:
            return known[1]  # unless let go by every worker and taken for another
        ident = (budget.name, budget.target, budget.start)
        if ident in self._unplaced:
            return None
        config = budget.config
        wanted = _hash(
            f"{budget.name}\0{config.scope}\0{budget.target}\0{config.period}\0"
            f"{config.timezone}\0{int(budget.start)}"
        )
        first = wanted % self.capacity
        reusable: int | None = None
        stale_before = time.time() - REUSE_AFTER
        free: int | None = None
        for step in range(self.capacity):
            at = _HEADER + ((first + step) % self.capacity) * self._slot
            found = words[at + _HASH]
            if found == wanted:
                budget.host_slot = (budget.start, at, wanted)
                return at
            if found == 0:
                free = at
                break
            if (
                reusable is None
                and words[at + _END] < stale_before
                and not any(words[at + _HELD : at + self._slot])
            ):
                reusable = at
        at_or_none = reusable if reusable is not None else free
        if at_or_none is None:
            self._full(ident)
            return None
        at = at_or_none
        words[at + _SPENT] = budget.spent_nano
        words[at + _ANNOUNCED] = max(passed(budget), default=0)
        words[at + _END] = int(budget.end)
        words[at + _HELD : at + self._slot] = memoryview(bytes(8 * self.workers)).cast("q")
        words[at + _HASH] = wanted
        budget.host_slot = (budget.start, at, wanted)
        return at

    def _full(self, ident: tuple[str, str | None, float]) -> None:
        self._unplaced.add(ident)
        if not self._told_full:
            self._told_full = True
            log.warning(
                "the workers' budget table is full (%d budgets in live periods): further "
                "budgets are counted by each worker on its own until their period ends",
                self.capacity,
            )

    def close(self) -> None:
        """A worker maps the table for as long as it runs; tests let go of theirs."""
        self._words.release()
        self._map.close()
        os.close(self._fd)


_NOTHING: set[int] = set()  # claimed nothing (never changed)


def _crossed(budget: Budget, spent: int) -> set[int]:
    return {p for p in budget.config.alert_at_percent if spent * 100 >= budget.limit_nano * p}


def _hash(name: str) -> int:
    """63 bits (a signed word), never 0, which marks a free slot."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1
