"""The ledger summed by hour: what budgets, the spend forecast and the console read
instead of every request of a period.

Three tables, each a row per hour and group:
- `usage_hours`, by team, model, upstream and outcome: requests, tokens, cost, saved
  cost and retries (a few rows an hour: what the gateway, a team, a model or an
  upstream did);
- `key_spend_hours`, by key, team and model: requests and cost (up to a row per key an
  hour: what a key spent);
- `latency_hours`, by model, upstream, kind (0: a request's whole latency, 1: its time
  to first token) and bin: how many requests took that long, in bins an eighth of a
  power of two wide (`latency_bin`), so a percentile read from them is within 4.5 % of
  the rows' own.

The database adds a batch's sums in the transaction that inserts its rows, right after
the insert (`sum_statements`: the event loop does none of it), and migration 12 filled
them from the rows before it (the same hours and bins, `storage.migrations`), so the
counts and sums always equal those of `requests`: a reader sees both or neither.
`HourSums` sums rows the same way in Python, for the hour under way the console adds.

A sum over `[start, end)` (`spend_source`) takes the whole hours inside it from a table
and the parts of an hour at either end from `requests` (its `ts` index finds them): at
most two hours of rows, whatever the period. An hour is the floor of `ts / 3600`, so a
row at exactly `h * 3600` is in hour `h`, as `ts >= h * 3600` says.

A team is stored as `''` when the request had none (a primary key cannot hold NULL);
`spend_source` gives it back as NULL. Rows removed from `requests` by hand are not
removed from here: the ledger is append-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from metergate.metering.ledger_row import LedgerRow
from metergate.storage.migrations import HOUR_OF_TS, LATENCY_BIN

HOUR = 3600
BINS_PER_DOUBLING = 8
_LEAST_MS = 2.0**-10  # faster than this counts in the lowest bin
LOWEST_BIN = -10 * BINS_PER_DOUBLING
DURATION, TTFT = 0, 1  # latency_hours.kind


USAGE_SUMS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_nano",
    "saved_nano",
    "retries",  # attempts beyond each request's first
)
# A batch's rows as the statements that sum them read them: on SQLite the last rows of
# `requests` (the batch's transaction holds the one write lock, so its rows took the
# next ids), on PostgreSQL the batch itself, sent again as one array per column read
# (other transactions take ids in between). Column: its PostgreSQL type.
_TYPES = {
    "ts": "float8",
    "key_name": "text",
    "model": "text",
    "upstream": "text",
    "attempts": "bigint",
    "input_tokens": "bigint",
    "cached_input_tokens": "bigint",
    "output_tokens": "bigint",
    "cost_nano": "bigint",
    "saved_nano": "bigint",
    "duration_ms": "float8",
    "ttft_ms": "float8",
    "outcome": "text",
    "team": "text",
}
_KEY_COLUMNS = ("ts", "key_name", "team", "model", "cost_nano")
_USAGE_COLUMNS = ("ts", "team", "model", "upstream", "outcome", *USAGE_SUMS[1:-1], "attempts")
_LATENCY_COLUMNS = ("ts", "model", "upstream", "duration_ms", "ttft_ms")
_RETRIES = "SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END)"


def _batch(dialect: str, columns: tuple[str, ...]) -> str:
    """The batch's rows, with their hour, as a subquery named `rows`."""
    if dialect == "sqlite":
        source = "requests WHERE id > (SELECT MAX(id) FROM requests) - ?"
    else:
        arrays = ", ".join(f"?::{_TYPES[name]}[]" for name in columns)
        source = f"unnest({arrays}) AS batch({', '.join(columns)})"
    return f"(SELECT {HOUR_OF_TS[dialect]} AS hour, {', '.join(columns)} FROM {source}) AS rows"


def _sum_into(
    table: str, group: tuple[tuple[str, str], ...], sums: str, source: str, added: tuple[str, ...]
) -> str:
    """Add `source`'s sums by hour and `group` ((expression, column) pairs) to `table`, in
    key order: every writer takes the rows' locks in the same order (PostgreSQL), so two
    batches cannot deadlock."""
    names = ", ".join(["hour", *(name for _, name in group)])
    picked = ", ".join(["hour", *(f"{expr} AS {name}" for expr, name in group)])
    by = ", ".join(str(n) for n in range(1, len(group) + 2))
    update = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in added)
    return (
        f"INSERT INTO {table} ({names}, {', '.join(added)}) "
        f"SELECT {picked}, {sums} FROM {source} GROUP BY {by} ORDER BY {by} "
        f"ON CONFLICT ({names}) DO UPDATE SET {update}"
    )


_TEAM = ("COALESCE(team, '')", "team")


def _statements(dialect: str) -> tuple[str, str, str]:
    keys = _sum_into(
        "key_spend_hours",
        (("key_name", "key_name"), _TEAM, ("model", "model")),
        "COUNT(*), SUM(cost_nano)",
        _batch(dialect, _KEY_COLUMNS),
        ("requests", "cost_nano"),
    )
    usage = _sum_into(
        "usage_hours",
        (_TEAM, ("model", "model"), ("upstream", "upstream"), ("outcome", "outcome")),
        ", ".join(["COUNT(*)", *(f"SUM({name})" for name in USAGE_SUMS[1:-1]), _RETRIES]),
        _batch(dialect, _USAGE_COLUMNS),
        USAGE_SUMS,
    )
    duration, ttft = (LATENCY_BIN[dialect].format(x=x) for x in ("duration_ms", "ttft_ms"))
    kinds = f"(SELECT {DURATION} AS kind UNION ALL SELECT {TTFT}) AS kinds"
    latency = _sum_into(
        "latency_hours",
        (
            ("model", "model"),
            ("upstream", "upstream"),
            ("kind", "kind"),
            (f"CASE kind WHEN {DURATION} THEN {duration} ELSE {ttft} END", "bin"),
        ),
        "COUNT(*)",
        f"{_batch(dialect, _LATENCY_COLUMNS)} CROSS JOIN {kinds} "
        f"WHERE kind = {DURATION} OR ttft_ms IS NOT NULL",
        ("requests",),
    )
    return keys, usage, latency


_STATEMENTS = {dialect: _statements(dialect) for dialect in ("sqlite", "postgresql")}


def sum_statements(dialect: str, batch: Sequence[LedgerRow]) -> list[tuple[str, list[Any]]]:
    """The statements that add a batch's sums to the tables, to run in the transaction
    that inserts it, right after: the database sums the rows, not the event loop."""
    keys, usage, latency = _STATEMENTS[dialect]
    if dialect == "sqlite":
        count = [(len(batch),)]
        return [(keys, count), (usage, count), (latency, count)]
    columns = list(zip(*batch, strict=True))

    def arrays(names: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return [tuple(list(columns[LedgerRow._fields.index(name)]) for name in names)]

    return [
        (keys, arrays(_KEY_COLUMNS)),
        (usage, arrays(_USAGE_COLUMNS)),
        (latency, arrays(_LATENCY_COLUMNS)),
    ]


def latency_bin(ms: float) -> int:
    """floor(8 * log2(ms)): the bin of `[2**(b/8), 2**((b+1)/8))` ms that holds `ms`."""
    if ms <= _LEAST_MS:
        return LOWEST_BIN
    return math.floor(BINS_PER_DOUBLING * math.log2(ms))


def bin_ms(bin_: int) -> float:
    """The middle of a bin (geometric): within 2**(1/16) (4.4 %) of anything in it."""
    return float(2.0 ** ((bin_ + 0.5) / BINS_PER_DOUBLING))


def nearest_rank(bins: dict[int, int], share: float = 0.95) -> float | None:
    """The `share` percentile, nearest rank, of the latencies counted in `bins`."""
    total = sum(bins.values())
    if not total:
        return None
    rank = math.ceil(share * total - 1e-9)
    seen = 0
    for bin_ in sorted(bins):
        seen += bins[bin_]
        if seen >= rank:
            return bin_ms(bin_)
    return bin_ms(max(bins))  # not reached: seen ends at total >= rank


class HourSums:
    """Ledger rows summed by hour as the tables hold them, in Python: what the rows of
    the hour under way add to the tables' sums when the console reads them."""

    __slots__ = ("keys", "latency", "usage")

    def __init__(self, rows: Iterable[LedgerRow] = ()) -> None:
        self.keys: dict[tuple[Any, ...], list[int]] = {}  # (hour, key, team, model)
        # (hour, team, model, upstream, outcome): USAGE_SUMS
        self.usage: dict[tuple[Any, ...], list[int]] = {}
        self.latency: dict[tuple[Any, ...], int] = {}  # (hour, model, upstream, kind, bin)
        self.add(rows)

    def add(self, rows: Iterable[LedgerRow]) -> None:
        for row in rows:
            hour, team, model = int(row.ts // HOUR), row.team or "", row.model
            found = self.keys.setdefault((hour, row.key_name, team, model), [0, 0])
            found[0] += 1
            found[1] += row.cost_nano
            group: tuple[Any, ...] = (hour, team, model, row.upstream, row.outcome)
            sums = self.usage.setdefault(group, [0] * len(USAGE_SUMS))
            values = (1, row.input_tokens, row.cached_input_tokens, row.output_tokens)
            retries = max(row.attempts - 1, 0)
            for index, value in enumerate((*values, row.cost_nano, row.saved_nano, retries)):
                sums[index] += value
            for kind, ms in ((DURATION, row.duration_ms), (TTFT, row.ttft_ms)):
                if ms is not None:
                    group = (hour, model, row.upstream, kind, latency_bin(ms))
                    self.latency[group] = self.latency.get(group, 0) + 1


def spend_source(
    start: float, end: float, where: str = "", params: Sequence[Any] = (), *, keys: bool = False
) -> tuple[str, list[Any]]:
    """A subquery, `(...) AS spend`, of rows `(team, model, requests, cost_nano)`, with
    `key_name` first when `keys`, whose sums are those of the ledger's requests in
    `[start, end)`.

    `where` (`" AND ..."` with `params`) may name `team` and `model` (and `key_name`
    when `keys`) compared with values (never NULL): both tables answer it as they stand."""
    group = "key_name, team, model" if keys else "team, model"
    table = "key_spend_hours" if keys else "usage_hours"
    return _hours_and_edges(start, end, where, params, table, group, "cost_nano")


USAGE_GROUPS = ("team", "model", "upstream")  # what `usage_source` can be grouped by


def usage_source(
    start: float, end: float, where: str = "", params: Sequence[Any] = ()
) -> tuple[str, list[Any]]:
    """As `spend_source`, rows `(team, model, upstream, outcome, requests, input_tokens,
    cached_input_tokens, output_tokens, cost_nano, saved_nano)`: what a usage report sums
    by team, model or upstream. `where` may name those three and `outcome`."""
    sums = ", ".join(USAGE_SUMS[1:-1])  # requests are counted apart; retries not read
    group = "team, model, upstream, outcome"
    return _hours_and_edges(start, end, where, params, "usage_hours", group, sums)


def _hours_and_edges(
    start: float,
    end: float,
    where: str,
    params: Sequence[Any],
    table: str,
    group: str,
    sums: str,
) -> tuple[str, list[Any]]:
    """`table`'s whole hours inside `[start, end)` and the ledger's rows of the parts of
    an hour at either end, as one subquery of `group`, `requests` and `sums`."""
    first = -int(-start // HOUR)  # whole hours [first, last); a float's // is exact, its
    last = int(end // HOUR)  # quotient is not (an hour's start could round either way)
    raw = f"SELECT {group}, 1 AS requests, {sums} FROM requests WHERE ts >= ? AND ts < ?"
    if first >= last:
        return f"({raw}{where}) AS spend", [start, end, *params]
    stored = group.replace("team", "NULLIF(team, '') AS team")
    hours = f"SELECT {stored}, requests, {sums} FROM {table} WHERE hour >= ? AND hour < ?"
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
