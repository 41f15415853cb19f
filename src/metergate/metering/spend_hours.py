"""The ledger's spend by hour: what budgets, the spend forecast and the console's lists
of keys and teams sum, without reading every request of a month.

`spend_hours` holds one row per hour, key, team and model: how many requests and what
they cost. The ledger writer adds a batch's hours in the transaction that inserts its
rows (`hour_rows`, `UPSERT`), and migration 12 filled it from the rows before it (the
same hours, `storage.migrations`), so it always holds exactly the sums of `requests`: a
reader sees both or neither.

A sum over `[start, end)` (`spend_source`) takes the whole hours inside it from
`spend_hours` and the parts of an hour at either end from `requests` (its `ts` index
finds them): at most two hours of rows, whatever the period. An hour is the floor of
`ts / 3600`, so a row at exactly `h * 3600` is in hour `h`, as `ts >= h * 3600` says.

A team is stored as `''` when the request had none (a primary key cannot hold NULL);
`spend_source` gives it back as NULL. Rows removed from `requests` by hand are not
removed from here: the ledger is append-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from metergate.metering.ledger_row import LedgerRow

HOUR = 3600

UPSERT = (
    "INSERT INTO spend_hours (hour, key_name, team, model, requests, cost_nano) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hour, key_name, team, model) DO UPDATE SET "
    "requests = spend_hours.requests + excluded.requests, "
    "cost_nano = spend_hours.cost_nano + excluded.cost_nano"
)


def hour_rows(batch: Iterable[LedgerRow]) -> list[tuple[int, str, str, str, int, int]]:
    """A batch's sums by hour, key, team and model, in key order: every writer takes
    the rows' locks in the same order (PostgreSQL), so two batches cannot deadlock."""
    sums: dict[tuple[int, str, str, str], list[int]] = {}
    for row in batch:
        group = (int(row.ts // HOUR), row.key_name, row.team or "", row.model)
        found = sums.get(group)
        if found is None:
            sums[group] = [1, row.cost_nano]
        else:
            found[0] += 1
            found[1] += row.cost_nano
    return [(*group, count, cost) for group, (count, cost) in sorted(sums.items())]


def spend_source(
    start: float, end: float, where: str = "", params: Sequence[Any] = ()
) -> tuple[str, list[Any]]:
    """A subquery, `(...) AS spend`, of rows `(key_name, team, model, requests,
    cost_nano)` whose sums are those of the ledger's requests in `[start, end)`.

    `where` (`" AND ..."` with `params`) may name `key_name`, `team` and `model`
    compared with values (never NULL): both tables answer it as they stand."""
    first = -int(-start // HOUR)  # whole hours [first, last); a float's // is exact, its
    last = int(end // HOUR)  # quotient is not (an hour's start could round either way)
    raw = (
        "SELECT key_name, team, model, 1 AS requests, cost_nano FROM requests "
        "WHERE ts >= ? AND ts < ?"
    )
    if first >= last:
        return f"({raw}{where}) AS spend", [start, end, *params]
    hours = (
        "SELECT key_name, NULLIF(team, '') AS team, model, requests, cost_nano "
        "FROM spend_hours WHERE hour >= ? AND hour < ?"
    )
    sql = f"({hours}{where} UNION ALL {raw}{where} UNION ALL {raw}{where}) AS spend"
    return sql, [
        first,
        last,
        *params,
        start,
        float(first * HOUR),
        *params,
        float(last * HOUR),
        end,
        *params,
    ]
