"""The ledger's spend by hour: what budgets, the spend forecast and the console's lists
of keys and teams sum, without reading every request of a month.

Two tables hold how many requests each hour had and what they cost: `spend_hours` by
team and model (a few rows an hour: what the whole gateway, a team or a model spent),
and `key_spend_hours` by key, team and model (up to a row per key an hour: what a key
spent). The ledger writer adds a batch's sums to both in the transaction that inserts
its rows (`sum_statements`), and migration 12 filled them from the rows before it (the
same hours, `storage.migrations`), so they always hold exactly the sums of `requests`:
a reader sees both or neither.

A sum over `[start, end)` (`spend_source`) takes the whole hours inside it from one of
them and the parts of an hour at either end from `requests` (its `ts` index finds
them): at most two hours of rows, whatever the period. An hour is the floor of
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


def _upsert(table: str, group: tuple[str, ...]) -> str:
    columns = ("hour", *group, "requests", "cost_nano")
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(columns[:-2])}) DO UPDATE SET "
        f"requests = {table}.requests + excluded.requests, "
        f"cost_nano = {table}.cost_nano + excluded.cost_nano"
    )


UPSERT = _upsert("spend_hours", ("team", "model"))
UPSERT_KEYS = _upsert("key_spend_hours", ("key_name", "team", "model"))

Sums = dict[tuple[Any, ...], list[int]]


def sum_statements(batch: Iterable[LedgerRow]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The statements that add a batch's sums by hour, each with its rows in key order:
    every writer takes the rows' locks in the same order (PostgreSQL), so two batches
    cannot deadlock."""
    by_key: Sums = {}
    for row in batch:  # once for every request: _add written out
        group = (int(row.ts // HOUR), row.key_name, row.team or "", row.model)
        found = by_key.get(group)
        if found is None:
            by_key[group] = [1, row.cost_nano]
        else:
            found[0] += 1
            found[1] += row.cost_nano
    by_model: Sums = {}
    for (hour, _, team, model), (count, cost) in by_key.items():
        _add(by_model, (hour, team, model), count, cost)
    return [(UPSERT_KEYS, _rows(by_key)), (UPSERT, _rows(by_model))]


def _add(sums: Sums, group: tuple[Any, ...], count: int, cost: int) -> None:
    found = sums.get(group)
    if found is None:
        sums[group] = [count, cost]
    else:
        found[0] += count
        found[1] += cost


def _rows(sums: Sums) -> list[tuple[Any, ...]]:
    return [(*group, count, cost) for group, (count, cost) in sorted(sums.items())]


def spend_source(
    start: float, end: float, where: str = "", params: Sequence[Any] = (), *, keys: bool = False
) -> tuple[str, list[Any]]:
    """A subquery, `(...) AS spend`, of rows `(team, model, requests, cost_nano)`, with
    `key_name` first when `keys`, whose sums are those of the ledger's requests in
    `[start, end)`.

    `where` (`" AND ..."` with `params`) may name `team` and `model` (and `key_name`
    when `keys`) compared with values (never NULL): both tables answer it as they stand."""
    first = -int(-start // HOUR)  # whole hours [first, last); a float's // is exact, its
    last = int(end // HOUR)  # quotient is not (an hour's start could round either way)
    group = "key_name, team, model" if keys else "team, model"
    raw = f"SELECT {group}, 1 AS requests, cost_nano FROM requests WHERE ts >= ? AND ts < ?"
    if first >= last:
        return f"({raw}{where}) AS spend", [start, end, *params]
    sums = group.replace("team", "NULLIF(team, '') AS team")
    table = "key_spend_hours" if keys else "spend_hours"
    hours = f"SELECT {sums}, requests, cost_nano FROM {table} WHERE hour >= ? AND hour < ?"
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
