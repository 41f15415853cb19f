"""Budget spend and holds shared by the workers of one host (`serve --workers N`
without Redis).

Each worker used to count only its own spend, so N workers could each spend a hard
budget's whole limit. The workers now keep every budget's state in one file they all
map, beside the rate-limit table (`limits.host`). A slot holds, for one budget (or one
key's member of a budget for each key) in one period:

- the spend the ledger gave it when the first worker to use it made it (no worker had
  spent on it then);
- one column of spend and one of holds per worker, written by that worker alone, so
  that spending and settling take no lock: a word is one aligned 8-byte store, and the
  others only read it;
- the highest alert threshold announced, so each crossing is announced by one worker;
- the period's end, after which (and a day more) the slot may be taken for another.

A budget's spend is the seed plus every worker's column; what requests in flight hold
is the sum of the holds. A hard budget's admission reads both and holds the worst case
under the host's admission lock (the rate limits' `flock`), so admissions are one at a
time and N workers admit a limit once. A settle adds the cost to its worker's spend
before it lets the hold go, and an admission reads the holds before the spend, so what
it reads is never less than the truth.
Requests under soft budgets only take no lock at all. Making a slot and claiming a
threshold take a second lock, on this file, only when they happen.

A dead worker's replacement takes over its columns: its spend stays (it was spent),
and the supervisor zeroes its holds first (`release_worker`), as its requests are gone.
A full table keeps further budgets in each worker's memory and says so once.

Bounds: a budget new in a reload misses what workers still on the old config spend in
the seconds (≤ 2 s) before they follow it; a worker killed while it settles a request
may have added its cost to some of the request's budgets and not yet to the others.
The ledger has both, and a restart counts them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

from metergate.budgets.book import BudgetBook, Reservation, exhausted
from metergate.budgets.budget import Budget, passed
from metergate.metering.estimate import WorstCase
from metergate.metering.mmapfile import allocate

log = logging.getLogger("metergate.budgets")
Seen = tuple[Budget, int, set[int]]  # a budget, its spend now, thresholds to announce

BUDGETS_FILE = "budgets"  # in the directory of the host's tables, beside the rate limits
CAPACITY = 1 << 14  # budgets, and members of budgets for each key, in live periods
REUSE_AFTER = 86_400  # seconds past a slot's period end before it may be taken
_MAGIC = int.from_bytes(b"mgbudg03", "little")
# The file is signed 64-bit words: a header (magic, capacity, workers), then the slots:
_HASH, _SEED, _ANNOUNCED, _END, _COLUMNS = range(5)  # the name's hash (0: free), the
# ledger's spend when made, the highest threshold announced, the period's end (epoch
# s), then each worker's spend and each worker's holds (nano-USD): 4 + 2 x workers words
_HEADER = 3


def create_table(path: Path, workers: int, capacity: int = CAPACITY) -> None:
    """Make the zeroed file (the supervisor does, before any worker opens it)."""
    with path.open("wb") as file:
        for word in (_MAGIC, capacity, workers):
            file.write(word.to_bytes(8, "little", signed=True))
        file.flush()
        allocate(file, 8 * (_HEADER + capacity * (_COLUMNS + 2 * workers)))  # (as the rates')


def release_worker(path: Path, worker: int) -> int:
    """Zero what `worker` holds on every budget (it died with requests in flight; its
    replacement starts in its columns); the nano-USD let go."""
    table = HostBudgets(path, worker, contextlib.nullcontext())
    try:
        return table.release_holds()
    finally:
        table.close()


class HostBudgets:
    """One worker's view of the table: `reserve` and `settle` are `BudgetBook.reserve`
    and `settle` on the host's counters. The caller holds `lock`, the host's admission
    lock, around `reserve` when a budget is hard (`needs_lock`); `settle` takes none
    (`show` after it, outside any lock, says what it found)."""

    def __init__(self, path: Path, worker: int, lock: contextlib.AbstractContextManager[None]):
        self.lock = lock
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        self._words = memoryview(self._map).cast("q")  # a word read or written: ~30 ns
        magic, self.capacity, self.workers = self._words[:_HEADER]
        self._slot = _COLUMNS + 2 * self.workers
        if magic != _MAGIC or len(self._words) != _HEADER + self.capacity * self._slot:
            self.close()
            raise ValueError(f"{path} is not a budget table")
        if not 0 <= worker < self.workers:
            self.close()
            raise ValueError(f"worker {worker} has no column in {path} ({self.workers})")
        self._spent = _COLUMNS + worker  # this worker's columns in a slot
        self._held = _COLUMNS + self.workers + worker
        self._unplaced: set[tuple[str, str | None, float]] = set()
        self._told_full = False

    @staticmethod
    def needs_lock(budgets: tuple[Budget, ...]) -> bool:
        """Whether admitting under `budgets` takes the admission lock: a hard one."""
        return any(budget.config.hard for budget in budgets)

    def reserve(
        self, book: BudgetBook, budgets: tuple[Budget, ...], worst: WorstCase
    ) -> Reservation:
        """Hold the worst case on every budget, or raise the 429 of a hard one it would
        pass, counting every worker's spend and holds. Call with `lock` held if
        `needs_lock(budgets)`."""
        if not budgets:
            return Reservation((), 0)
        book.roll(budgets)
        worst_nano, words = worst.nano, self._words
        spent_at, held_at, end_at = _COLUMNS, _COLUMNS + self.workers, self._slot
        slots: list[int | None] = []
        for budget in budgets:
            at = self._find(budget)
            slots.append(at)
            if not budget.config.hard:
                continue
            if at is None:  # the full table has no slot for it: this worker's counts
                spent, held = budget.spent_nano, budget.reserved_nano
            else:
                # holds first: a settle between the two reads is then counted twice
                # (its cost and its hold), never not at all
                held = sum(words[at + held_at : at + end_at])
                spent = words[at + _SEED] + sum(words[at + spent_at : at + held_at])
                budget.spent_nano = spent
            if spent + held + worst_nano > budget.limit_nano:
                raise exhausted(budget, worst, spent, held)
        mine = self._held
        for budget, at in zip(budgets, slots, strict=True):
            budget.reserved_nano += worst_nano
            if at is not None:
                words[at + mine] += worst_nano
        return Reservation(budgets, worst_nano, tuple(slots))

    def settle(
        self, book: BudgetBook, reservation: Reservation, actual_nano: int, at: float
    ) -> list[Seen]:
        """Replace the holds by what the request cost, dated `at` as its ledger row (see
        `BudgetBook.settle`): the cost into this worker's spend first, then the hold let
        go. What each budget's spend is now, for `show`."""
        words, amount = self._words, reservation.amount_nano
        spent_at, held_at = _COLUMNS, _COLUMNS + self.workers
        seen: list[Seen] = []
        for budget, slot_held in zip(reservation.budgets, reservation.slots, strict=True):
            while budget.successor is not None:  # rebuilt by a reload meanwhile: the cost
                budget.reserved_nano -= amount  # goes to its slot (the hold, from where
                budget = budget.successor  # it was put)
            if at >= budget.end:
                book.roll((budget,), at)
            counted = at >= budget.start  # not when dated in a period another request ended
            slot = self._find(budget) if counted else None
            if slot is not None:
                words[slot + self._spent] += actual_nano
            budget.reserved_nano -= amount
            if slot_held is not None:
                words[slot_held + self._held] -= amount
            if not counted:
                continue
            if slot is None:
                budget.spent_nano += actual_nano
                seen.append((budget, budget.spent_nano, _crossed(budget, budget.spent_nano)))
                continue
            spent = words[slot + _SEED] + sum(words[slot + spent_at : slot + held_at])
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
        words = self._words
        if _top(budget, spent) == words[at + _ANNOUNCED]:
            return _NOTHING
        with self._structure():  # another worker may be claiming it too
            # the spend as it is now: `spent` may be older than another worker's claim,
            # and a mark brought down by it would have a crossing announced twice
            held_at = _COLUMNS + self.workers
            spent = words[at + _SEED] + sum(words[at + _COLUMNS : at + held_at])
            announced, top = words[at + _ANNOUNCED], _top(budget, spent)
            words[at + _ANNOUNCED] = top
        return {p for p in _crossed(budget, spent) if p > announced}

    def _find(self, budget: Budget) -> int | None:
        """The index of the budget's slot in its current period, made (seeded with the
        spend this worker knows) when no worker made it yet; None if the table is full."""
        known = budget.host_slot
        if known is not None and known[0] == budget.start and self._words[known[1]] == known[2]:
            return known[1]  # unless let go by every worker and taken for another
        ident = (budget.name, budget.target, budget.start)
        if ident in self._unplaced:
            return None
        wanted = _name_hash(budget)
        with self._structure():
            at = self._probe(wanted, budget)
        if at is None:
            self._full(ident)
        else:
            budget.host_slot = (budget.start, at, wanted)
        return at

    def held_nano(self, budget: Budget) -> int:
        """What every worker's requests in flight hold on `budget` now (for the console:
        a snapshot, read without a lock); this worker's own when no worker placed it."""
        at = self._placed(budget)
        if at is None:
            return budget.reserved_nano
        return sum(self._words[at + _COLUMNS + self.workers : at + self._slot])

    def _placed(self, budget: Budget) -> int | None:
        """The index of the budget's slot in its period if some worker made it; never
        makes one (a slot's name is written last, so a slot being made reads as free)."""
        known = budget.host_slot
        if known is not None and known[0] == budget.start and self._words[known[1]] == known[2]:
            return known[1]
        wanted = _name_hash(budget)
        for at, found in self._probing(wanted):
            if found == wanted:
                return at
            if found == 0:
                return None
        return None

    def _probing(self, wanted: int) -> Iterator[tuple[int, int]]:
        """The slots the name `wanted` may be in, in the order it is looked for there:
        (index, the name the slot holds)."""
        first = wanted % self.capacity
        for step in range(self.capacity):
            at = _HEADER + ((first + step) % self.capacity) * self._slot
            yield at, self._words[at + _HASH]

    def _probe(self, wanted: int, budget: Budget) -> int | None:
        """Find the slot named `wanted`, or make it (under the structure lock)."""
        words = self._words
        reusable: int | None = None
        free: int | None = None
        stale_before = time.time() - REUSE_AFTER
        held_at = _COLUMNS + self.workers
        for at, found in self._probing(wanted):
            if found == wanted:
                return at
            if found == 0:
                free = at
                break
            if (
                reusable is None
                and words[at + _END] < stale_before
                and not any(words[at + held_at : at + self._slot])
            ):
                reusable = at
        at_or_none = reusable if reusable is not None else free
        if at_or_none is None:
            return None
        at = at_or_none
        words[at + _SEED] = budget.spent_nano
        words[at + _ANNOUNCED] = max(passed(budget), default=0)
        words[at + _END] = int(budget.end)
        words[at + _COLUMNS : at + self._slot] = memoryview(bytes(16 * self.workers)).cast("q")
        words[at + _HASH] = wanted
        return at

    def release_holds(self) -> int:
        """Zero this worker's holds on every budget; the nano-USD let go."""
        words, released = self._words, 0
        with self._structure():
            for at in range(_HEADER + self._held, len(words), self._slot):
                released += words[at]
                words[at] = 0
        return released

    @contextlib.contextmanager
    def _structure(self) -> Iterator[None]:
        """The lock for making slots and claiming thresholds (rare): on this file, apart
        from the admission lock, and never held while taking that one."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

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


def _top(budget: Budget, spent: int) -> int:
    """The highest threshold `spent` crosses, 0 for none."""
    limit = budget.limit_nano
    for percent in reversed(budget.config.alert_at_percent):  # sorted
        if spent * 100 >= limit * percent:
            return percent
    return 0


def _crossed(budget: Budget, spent: int) -> set[int]:
    return {p for p in budget.config.alert_at_percent if spent * 100 >= budget.limit_nano * p}


def _hash(name: str) -> int:
    """63 bits (a signed word), never 0, which marks a free slot."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def _name_hash(budget: Budget) -> int:
    """A budget's slot name: what it counts, in which period. The period by its kind and
    start, not its time zone: a zone renamed (UTC, Etc/UTC) or one with the same offset
    now is the same period, so a budget a reload rebuilds for it keeps its slot, also in
    the workers that apply the reload later than the others."""
    config = budget.config
    return _hash(
        f"{budget.name}\0{config.scope}\0{budget.target}\0{config.period}\0{int(budget.start)}"
    )
