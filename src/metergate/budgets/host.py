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

Bound: a budget new in a reload misses what workers still on the old config spend in
the seconds (≤ 2 s) before they follow it; the ledger has it, and a restart counts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import struct
import time
from pathlib import Path

from metergate.budgets.book import BudgetBook, Reservation, exhausted
from metergate.budgets.budget import Budget, passed
from metergate.metering.estimate import WorstCase

log = logging.getLogger("metergate.budgets")

BUDGETS_FILE = "budgets"  # in the directory of the host's tables, beside the rate limits
CAPACITY = 1 << 14  # budgets, and members of budgets for each key, in live periods
REUSE_AFTER = 86_400  # seconds past a slot's period end before it may be taken
_HEADER = struct.Struct("<8sQQ")  # magic, capacity, workers
_MAGIC = b"mgbudg01"
_HEAD = struct.Struct("<QqqdQ")  # name hash (0: free), spent, announced up to, end, spare
_NAME = struct.Struct("<Q")
_SPENT = struct.Struct("<q")  # also a column of holds, and the threshold mark
_HELD = _SPENT
_ANNOUNCED = _SPENT
_SPENT_AT, _ANNOUNCED_AT = 8, 16  # offsets in a slot


def _slot_size(workers: int) -> int:
    return _HEAD.size + workers * _HELD.size


def create_table(path: Path, workers: int, capacity: int = CAPACITY) -> None:
    """Make the zeroed file (the supervisor does, before any worker opens it)."""
    with path.open("wb") as file:
        file.write(_HEADER.pack(_MAGIC, capacity, workers))
        file.truncate(_HEADER.size + capacity * _slot_size(workers))


def release_worker(path: Path, worker: int, lock: contextlib.AbstractContextManager[None]) -> int:
    """Zero what `worker` holds on every budget (it died with requests in flight; its
    replacement starts in its column); the nano-USD let go."""
    table = HostBudgets(path, worker, lock)
    released = 0
    try:
        with lock:
            for at in range(_HEADER.size, len(table._map), table._slot):
                column = at + _HEAD.size + worker * _HELD.size
                (held,) = _HELD.unpack_from(table._map, column)
                if held:
                    released += held
                    _HELD.pack_into(table._map, column, 0)
    finally:
        table.close()
    return released


class HostBudgets:
    """One worker's view of the table: `reserve` and `settle` are `BudgetBook.reserve`
    and `settle` on the host's counters. The caller holds `lock` around `reserve`;
    `settle` takes it."""

    def __init__(self, path: Path, worker: int, lock: contextlib.AbstractContextManager[None]):
        self.lock = lock
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        magic, self.capacity, self.workers = _HEADER.unpack_from(self._map, 0)
        self._slot = _slot_size(self.workers)
        if magic != _MAGIC or len(self._map) != _HEADER.size + self.capacity * self._slot:
            raise ValueError(f"{path} is not a budget table")
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} has no column in {path} ({self.workers})")
        self._mine = _HEAD.size + worker * _HELD.size  # this worker's column in a slot
        self._helds = struct.Struct(f"<{self.workers}q")
        self._slot_of: dict[tuple[str, str | None, float], tuple[int, int]] = {}
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
        worst_nano = worst.nano
        slots = tuple(self._find(budget) for budget in budgets)
        for budget, at in zip(budgets, slots, strict=True):
            if at is None:  # the full table has no slot for it: this worker's counts
                spent, held = budget.spent_nano, budget.reserved_nano
            else:
                spent = budget.spent_nano = _SPENT.unpack_from(self._map, at + _SPENT_AT)[0]
                held = sum(self._helds.unpack_from(self._map, at + _HEAD.size))
            if budget.config.hard and spent + held + worst_nano > budget.limit_nano:
                raise exhausted(budget, worst, spent, held)
        for budget, at in zip(budgets, slots, strict=True):
            budget.reserved_nano += worst_nano
            if at is not None:
                self._add(at + self._mine, worst_nano)
        return Reservation(budgets, worst_nano, slots)

    def settle(
        self, book: BudgetBook, reservation: Reservation, actual_nano: int, at: float
    ) -> None:
        """Replace the holds by what the request cost, dated `at` as its ledger row (see
        `BudgetBook.settle`); then show the host's spend and announce the thresholds
        this worker was first to see crossed, outside the lock."""
        seen: list[tuple[Budget, int, set[int]]] = []
        with self.lock:
            for budget, held_at in zip(reservation.budgets, reservation.slots, strict=True):
                budget.reserved_nano -= reservation.amount_nano
                if held_at is not None:
                    self._add(held_at + self._mine, -reservation.amount_nano)
                book.roll((budget,), at)
                if at < budget.start:  # dated in a period another request ended
                    continue
                slot = self._find(budget)
                if slot is None:
                    budget.spent_nano += actual_nano
                    seen.append((budget, budget.spent_nano, _crossed(budget, budget.spent_nano)))
                    continue
                spent = self._add(slot + _SPENT_AT, actual_nano)
                seen.append((budget, spent, self._claim(slot, budget, spent)))
        for budget, spent, claimed in seen:
            book.observe(budget, spent, claimed)

    def _add(self, at: int, nano: int) -> int:
        (value,) = _SPENT.unpack_from(self._map, at)
        value += nano
        _SPENT.pack_into(self._map, at, value)
        return int(value)

    def _claim(self, at: int, budget: Budget, spent: int) -> set[int]:
        """The thresholds `spent` crosses that no worker announced yet, now this one's.
        Under a raised limit the mark comes down, as `book._update` lets thresholds be
        announced again when they are reached again."""
        crossed = _crossed(budget, spent)
        top = max(crossed, default=0)
        (announced,) = _ANNOUNCED.unpack_from(self._map, at + _ANNOUNCED_AT)
        if top == announced:
            return set()
        _ANNOUNCED.pack_into(self._map, at + _ANNOUNCED_AT, top)
        return {p for p in crossed if p > announced}

    def _find(self, budget: Budget) -> int | None:
        """The offset of the budget's slot in its current period, made (seeded with the
        spend this worker knows) when no worker made it yet; None if the table is full."""
        ident = (budget.name, budget.target, budget.start)
        known = self._slot_of.get(ident)
        if known is not None:
            at, wanted = known
            if _NAME.unpack_from(self._map, at)[0] == wanted:
                return at
            del self._slot_of[ident]  # let go by every worker and taken for another
        if ident in self._unplaced:
            return None
        config = budget.config
        name = f"{budget.name}\0{config.scope}\0{budget.target}\0{config.period}\0{config.timezone}"
        wanted = _hash(f"{name}\0{int(budget.start)}")
        start = wanted % self.capacity
        reusable: int | None = None
        stale_before = time.time() - REUSE_AFTER
        for step in range(self.capacity):
            at = _HEADER.size + ((start + step) % self.capacity) * self._slot
            found, _, _, end, _ = _HEAD.unpack_from(self._map, at)
            if found == wanted:
                self._slot_of[ident] = (at, wanted)
                return at
            if found == 0:
                break
            if (
                reusable is None
                and end < stale_before
                and not any(self._helds.unpack_from(self._map, at + _HEAD.size))
            ):
                reusable = at
        else:
            at = -1  # every slot probed: only a reusable one may be taken
        if reusable is not None:
            at = reusable
        if at < 0:
            self._full(ident)
            return None
        announced = max(passed(budget), default=0)
        _HEAD.pack_into(self._map, at, wanted, budget.spent_nano, announced, budget.end, 0)
        self._helds.pack_into(self._map, at + _HEAD.size, *([0] * self.workers))
        self._slot_of[ident] = (at, wanted)
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
        self._map.close()
        os.close(self._fd)


def _crossed(budget: Budget, spent: int) -> set[int]:
    return {p for p in budget.config.alert_at_percent if spent * 100 >= budget.limit_nano * p}


def _hash(name: str) -> int:
    """Never 0, which marks a free slot."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1
