"""What a request under budgets pays for budgets shared by the workers of a host.

    .venv/bin/python bench/budget_table.py [--requests 20000] [--rounds 5]

A request under budgets holds its worst case on each (under the host's lock, as an
admission does) and settles its cost when it ends. Both run here, in a loop, for a
request under two hard budgets (a global one and its key's): kept by the process (the
book alone, one worker) and in the workers' shared table (`budgets.host`), alone and
with a second process spending on the same global budget at the same time.
Microseconds per request, the median of `--rounds`; `bench/results/budget-table.md`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from benchlib import report
from metergate.budgets import BudgetBook
from metergate.budgets.host import HostBudgets
from metergate.budgets.host import create_table as create_budgets
from metergate.config.model import BudgetConfig
from metergate.limits.host import HostTats
from metergate.limits.host import create_table as create_rates
from metergate.metering.estimate import WorstCase
from metergate.metering.metrics import Metrics

BENCH = Path(__file__).resolve().parent
BIG = Decimal(10**9)  # never reached: every request is admitted
WORST = WorstCase(nano=50_000, byte_pico=0, prompt_pico=0, token_pico=0, max_tokens=0)


def per_request_us(tables: str | None, worker: int, requests: int) -> float:
    book = BudgetBook(
        {
            "total": BudgetConfig(limit_usd=BIG),
            "alice": BudgetConfig(scope="key", target="alice", limit_usd=BIG),
        },
        Metrics(),
    )
    budgets = book.applicable("alice", "model")
    host = lock = None
    if tables is not None:
        lock = HostTats(Path(tables, "rates"))
        host = HostBudgets(Path(tables, "budgets"), worker, lock)
    began = time.perf_counter()
    for _ in range(requests):
        if host is None or lock is None:
            book.settle(book.reserve(budgets, WORST), 40_000, time.time())
            continue
        with lock:  # as `Gate.admit` and `Gate.settle` do
            reservation = host.reserve(book, budgets, WORST)
        with lock:
            seen = host.settle(book, reservation, 40_000, time.time())
        host.show(book, seen)
    return (time.perf_counter() - began) / requests * 1e6


def both_at_once(tables: str, requests: int) -> float:
    """Two processes spending on the global budget together: the first's time."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(2) as pool:
        times = pool.starmap(per_request_us, [(tables, 0, requests), (tables, 1, requests)])
    return times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "budget-table.md")
    args = parser.parse_args()
    kinds = ("the process's book", "shared table", "shared table, 2 processes")
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):  # interleaved: a slow moment touches all three
            tables = Path(scratch, str(round_))
            tables.mkdir()
            create_rates(tables / "rates")
            create_budgets(tables / "budgets", workers=2)
            runs[kinds[0]].append(per_request_us(None, 0, args.requests))
            runs[kinds[1]].append(per_request_us(str(tables), 0, args.requests))
            runs[kinds[2]].append(both_at_once(str(tables), args.requests))
    report.publish_medians(
        "Budgets shared by the workers: cost per request under budgets",
        __doc__,
        "budgets kept in",
        runs,
        args.output,
    )


if __name__ == "__main__":
    main()
