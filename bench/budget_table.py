"""What a request under budgets pays for budgets shared by the workers of a host.

    .venv/bin/python bench/budget_table.py [--requests 20000] [--rounds 5]

A request under budgets holds its worst case on each (a hard one under the host's
admission lock, as `Gate.admit` does) and settles its cost when it ends (no lock). Both
run here, in a loop, for a request under two budgets (a global one and its key's), hard
and then soft: kept by the process (the book alone, one worker) and in the workers'
shared table (`budgets.host`), alone and with a second process spending on the same
budgets at the same time (both let go by a barrier; the slower's time). Microseconds per
request, the median of `--rounds`; `bench/results/budget-table.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing.synchronize
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from benchlib import report, together
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


def per_request_us(
    tables: str | None,
    worker: int,
    requests: int,
    hard: bool = True,
    start: multiprocessing.synchronize.Barrier | None = None,
) -> float:
    book = BudgetBook(
        {
            "total": BudgetConfig(limit_usd=BIG, hard=hard),
            "alice": BudgetConfig(scope="key", target="alice", limit_usd=BIG, hard=hard),
        },
        Metrics(),
    )
    budgets = book.applicable("alice", "model")
    if tables is None:
        began = time.perf_counter()
        for _ in range(requests):
            book.settle(book.reserve(budgets, WORST), 40_000, time.time())
        return (time.perf_counter() - began) / requests * 1e6
    lock = HostTats(Path(tables, "rates"))
    host = HostBudgets(Path(tables, "budgets"), worker, lock)
    admission = lock if host.needs_lock(budgets) else contextlib.nullcontext()
    if start is not None:
        start.wait()
    began = time.perf_counter()
    for _ in range(requests):
        with admission:
            reservation = host.reserve(book, budgets, WORST)
        host.show(book, host.settle(book, reservation, 40_000, time.time()))
    return (time.perf_counter() - began) / requests * 1e6


def both_at_once(tables: str, requests: int, hard: bool) -> float:
    """Two processes spending on the same budgets at once: the slower's time."""
    return together.slowest_at_once(
        per_request_us, [(tables, 0, requests, hard), (tables, 1, requests, hard)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "budget-table.md")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):  # interleaved: a slow moment touches every kind
            for hard in (True, False):
                tables = Path(scratch, f"{round_}-{hard}")
                tables.mkdir()
                create_rates(tables / "rates")
                create_budgets(tables / "budgets", workers=2)
                kind = "hard" if hard else "soft"
                times = {
                    f"{kind}: the process's book": per_request_us(None, 0, args.requests, hard),
                    f"{kind}: shared table": per_request_us(str(tables), 0, args.requests, hard),
                    f"{kind}: shared table, 2 processes": both_at_once(
                        str(tables), args.requests, hard
                    ),
                }
                for name, value in times.items():
                    runs.setdefault(name, []).append(value)
    report.publish_medians(
        "Budgets shared by the workers: cost per request under budgets",
        __doc__,
        "budgets kept in",
        runs,
        args.output,
    )


if __name__ == "__main__":
    main()
