"""Usage reports over the ledger: who spent what, how reliably, and where the month ends.

Everything is read back from the `requests` table, so a report shows what actually
happened. Money stays in integer nano-USD end to end (summed in SQL as integers, priced
with integer `UnitPrices`); only the caller turns it into text. The SQL is plain enough
(CTEs, window functions, integer arithmetic) to run unchanged on SQLite 3.25+ and
PostgreSQL. Periods are half-open: `start <= ts < end`, in epoch seconds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from metergate.config.model import GatewayConfig, Price
from metergate.config.observe import TAG_NAME
from metergate.metering.hourly import USAGE_GROUPS, spend_source, usage_source
from metergate.metering.pricing import UnitPrices
from metergate.providers.base import Usage
from metergate.storage.database import Database

GroupBy = str  # model, key, upstream, team, or tag:NAME (the request tag NAME)
FIXED_GROUPS = ("model", "key", "upstream", "team")
NO_VALUE = "(none)"  # the group of requests without a team, or without the tag

# Failures on the gateway's or the provider's side: what an error rate should measure.
ERROR_OUTCOMES = (
    "upstream_error",
    "upstream_rejected",
    "timeout",
    "connection_error",
    "gateway_error",
)
# Requests turned away because of the caller (bad request, key, rate or budget): not
# failures of the service, so they are counted apart and left out of the error rate.
REFUSED_OUTCOMES = ("invalid_request", "unauthorized", "rate_limited", "budget_exceeded")

_GROUP_COLUMNS: dict[GroupBy, str] = {
    "model": "model",
    "key": "key_name",
    "upstream": "upstream",
    "team": "team",
}
# A CSV cell starting with one of these runs as a formula when the file is opened in a
# spreadsheet; key names, models, tag values and request ids come from callers.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_HOUR = 3600
_DAY = 86_400


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def csv_text(value: str) -> str:
    """A text cell for a CSV export, prefixed with `'` when a spreadsheet would run it as
    a formula (`=HYPERLINK(...)` as a tag value). For text only: `-1.5` as a number is
    written by the exporter itself and must stay a number."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Totals of one group of ledger rows; `name` is None for the row totalling all groups."""

    name: str | None
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nano: int
    saved_nano: int
    errors: int
    refused: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        """Errors among the requests the gateway tried to serve (refused ones excluded)."""
        served = self.requests - self.refused
        return self.errors / served if served else None


# p95 by the nearest-rank method: the value at rank ceil(0.95 n) in ascending order,
# written (95 n + 99) / 100 because both databases divide integers exactly that way.
_SUMMARY_SQL = """WITH ranked AS (
  SELECT {group} AS grp, input_tokens, cached_input_tokens, output_tokens, cost_nano,
    saved_nano, outcome, duration_ms,
    ROW_NUMBER() OVER ({window} ORDER BY duration_ms) AS rn,
    COUNT(*) OVER ({window}) AS n
  FROM requests WHERE ts >= ? AND ts < ?{where}
)
SELECT grp, COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
  SUM(cost_nano), SUM(saved_nano),
  SUM(CASE WHEN outcome IN ({errors}) THEN 1 ELSE 0 END),
  SUM(CASE WHEN outcome IN ({refused}) THEN 1 ELSE 0 END),
  MAX(CASE WHEN rn = (95 * n + 99) / 100 THEN duration_ms END){count}
FROM ranked GROUP BY grp{order}"""


# The costliest groups first, in `usage_summary`'s order, and how many groups there are
# in all (the window counts the groups before LIMIT cuts them).
_TOP_COUNT = ",\n  COUNT(*) OVER ()"
_TOP_ORDER = f"\nORDER BY SUM(cost_nano) DESC, COUNT(*) DESC, COALESCE(grp, '{NO_VALUE}')\nLIMIT ?"


# A group's sums, without its percentile, over a `_source` (whose `requests` column
# counts the requests each of its rows stands for).
_SUMS = f"""SUM(requests), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
  SUM(cost_nano), SUM(saved_nano),
  SUM(CASE WHEN outcome IN ({_sql_list(ERROR_OUTCOMES)}) THEN requests ELSE 0 END),
  SUM(CASE WHEN outcome IN ({_sql_list(REFUSED_OUTCOMES)}) THEN requests ELSE 0 END)"""
# The same nearest-rank p95 as the value at rank n - ceil(0.95 n) from the top: the
# database then keeps only that many rows while sorting (5 % of them) instead of
# numbering every row, 4x faster on 200,000 rows. The rank is counted in the same
# statement, so both see the same rows while the ledger writes. Parameters: the
# period and the filter's, twice.
_P95_FROM_TOP = """SELECT duration_ms FROM requests WHERE ts >= ? AND ts < ?{where}
ORDER BY duration_ms DESC LIMIT 1 OFFSET (
  SELECT COUNT(*) - (95 * COUNT(*) + 99) / 100 FROM requests WHERE ts >= ? AND ts < ?{where})"""
# The costliest groups of a `_source` without percentiles, each row ending in the
# number of groups; parameters: the source's, then the LIMIT.
_TOP_SUMS = f"""SELECT {{column}} AS grp, {_SUMS}, COUNT(*) OVER ()
FROM {{source}} GROUP BY {{column}}
ORDER BY SUM(cost_nano) DESC, SUM(requests) DESC, COALESCE({{column}}, '{NO_VALUE}')
LIMIT ?"""
# Groupings with few values in practice, and how many values still get a p95 query each
# (from the top, as the total's) rather than one that numbers every row of the period.
_FEW_VALUED = ("model", "upstream", "team")
_HOURLY_GROUPS = ("model", "key", "team")  # what `spend_by` reads from the sums by hour
_FEW = 8


def _summary_sql(column: str, where: str = "", top: bool = False) -> str:
    """The per-group query; `top`: only the costliest groups (LIMIT is the last
    parameter), each row ending in the number of groups."""
    return _SUMMARY_SQL.format(
        group=column,
        window=f"PARTITION BY {column}",
        errors=_sql_list(ERROR_OUTCOMES),
        refused=_sql_list(REFUSED_OUTCOMES),
        where=where,
        count=_TOP_COUNT if top else "",
        order=_TOP_ORDER if top else "",
    )


class UnknownGrouping(ValueError):
    """A `--by` / `by=` the report cannot group by; the message lists what it can."""


def tag_expression(dialect: str, name: str) -> str:
    """SQL for the value of request tag `name` (NULL when the request lacks it)."""
    if not TAG_NAME.fullmatch(name):
        raise UnknownGrouping(
            f"tag name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with one "
            "of the first two"
        )
    if dialect == "postgresql":
        return f"(tags::jsonb ->> '{name}')"
    return f"json_extract(tags, '$.\"{name}\"')"


def group_expression(dialect: str, group_by: GroupBy) -> str:
    if group_by in _GROUP_COLUMNS:
        return _GROUP_COLUMNS[group_by]
    if group_by.startswith("tag:"):
        return tag_expression(dialect, group_by[4:])
    raise UnknownGrouping(
        f"cannot group by {group_by!r}: use one of {', '.join(FIXED_GROUPS)} or tag:NAME"
    )


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Only requests of this team, carrying these tags (all of them) and, when `keys` is
    not empty, made with one of these key names."""

    team: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    keys: tuple[str, ...] = ()

    def sql(self, dialect: str) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if self.team is not None:
            clauses.append("team = ?")
            params.append(self.team)
        if self.keys:
            clauses.append(f"key_name IN ({', '.join('?' * len(self.keys))})")
            params.extend(self.keys)
        for name, value in self.tags:
            clauses.append(f"{tag_expression(dialect, name)} = ?")
            params.append(value)
        return "".join(f" AND {c}" for c in clauses), params


def _usage_group(name: str | None, row: Sequence[Any]) -> UsageGroup:
    # PostgreSQL returns SUM(bigint) as numeric (Decimal): int() keeps it exact.
    counts = [int(value or 0) for value in row[:8]]
    return UsageGroup(
        name,
        requests=counts[0],
        input_tokens=counts[1],
        cached_input_tokens=counts[2],
        output_tokens=counts[3],
        cost_nano=counts[4],
        saved_nano=counts[5],
        errors=counts[6],
        refused=counts[7],
        p95_ms=None if row[8] is None else float(row[8]),
    )


async def usage_summary(
    db: Database,
    group_by: GroupBy,
    start: float,
    end: float,
    only: UsageFilter | None = None,
    p95: bool = True,
) -> list[UsageGroup]:
    """Per-group totals in `[start, end)`, costliest first, then one total row (name None).

    `group_by` is model, key, upstream, team or `tag:NAME`; requests without a team (or
    without the tag) form the group `(none)`. Latency p95 covers every request of the
    group, refused ones included: it is what the callers waited. Percentiles do not add
    up, so the total row has its own query; they rank every request of the period, so
    `p95=False` leaves them out (None) for a report of spend alone.
    """
    only = only or UsageFilter()
    where, params = only.sql(db.dialect)
    period = (start, end, *params)
    column = group_expression(db.dialect, group_by)
    source = _source(db.dialect, group_by, start, end, only)
    rows = None
    if group_by in _FEW_VALUED:
        rows = await _few_groups(db, column, source, where, period, p95)
    if rows is None:
        if p95:
            rows = await db.fetch(_summary_sql(column, where), period)
        else:
            sql = f"SELECT {column}, {_SUMS}, NULL FROM {source[0]} GROUP BY {column}"
            rows = await db.fetch(sql, source[1])
    total = await _total(db, _source(db.dialect, None, start, end, only), where, period, p95)
    return [*_costliest_first(rows), total]


def _source(
    dialect: str, group_by: GroupBy | None, start: float, end: float, only: UsageFilter
) -> tuple[str, list[Any]]:
    """What a report's sums read, with its parameters: the sums by hour and the rows of
    the period's edges when the grouping (None: the total) and the filter are among their
    columns (`hourly.usage_source`), else every row of the period, each one request."""
    where, params = only.sql(dialect)
    if (group_by is None or group_by in USAGE_GROUPS) and not only.tags and not only.keys:
        return usage_source(start, end, where, params)
    rows = f"(SELECT *, 1 AS requests FROM requests WHERE ts >= ? AND ts < ?{where}) AS spend"
    return rows, [start, end, *params]


def _groups(rows: Sequence[Sequence[Any]]) -> list[UsageGroup]:
    return [_usage_group(NO_VALUE if row[0] is None else str(row[0]), row[1:]) for row in rows]


def _costliest_first(rows: Sequence[Sequence[Any]]) -> list[UsageGroup]:
    return costliest_first(_groups(rows))


def costliest_first(groups: Iterable[UsageGroup]) -> list[UsageGroup]:
    """The order of every summary: cost, then requests, then name."""
    return sorted(groups, key=lambda g: (-g.cost_nano, -g.requests, g.name or ""))


async def _few_groups(
    db: Database,
    column: str,
    source: tuple[str, list[Any]],
    where: str,
    period: tuple[Any, ...],
    p95: bool,
) -> list[tuple[Any, ...]] | None:
    """The summary's rows from the groups' sums and, with `p95`, one p95 query per group,
    or None when there are more than `_FEW` groups (numbering every row once is then
    cheaper)."""
    rows = await db.fetch(f"SELECT {column}, {_SUMS} FROM {source[0]} GROUP BY {column}", source[1])
    if len(rows) > _FEW:
        return None
    found = []
    for value, *figures in rows:
        if value is None:
            one, bound = f"{where} AND {column} IS NULL", period
        else:
            one, bound = f"{where} AND {column} = ?", (*period, value)
        p95_ms = None
        if p95:
            ranked = await db.fetch(_P95_FROM_TOP.format(where=one), bound * 2)
            p95_ms = ranked[0][0] if ranked else None
        found.append((value, *figures, p95_ms))
    return found


async def _total(
    db: Database,
    source: tuple[str, list[Any]],
    where: str,
    period: tuple[Any, ...],
    p95: bool,
) -> UsageGroup:
    sums = await db.fetch(f"SELECT {_SUMS} FROM {source[0]}", source[1])
    p95_ms = None
    if p95:
        ranked = await db.fetch(_P95_FROM_TOP.format(where=where), period * 2)
        p95_ms = ranked[0][0] if ranked else None
    return _usage_group(None, (*(sums[0] if sums else (None,) * 8), p95_ms))


@dataclass(frozen=True, slots=True)
class Spend:
    requests: int
    cost_nano: int


async def spend_by(
    db: Database,
    group_by: GroupBy,
    start: float,
    end: float,
    only: UsageFilter | None = None,
) -> dict[str, Spend]:
    """Requests and cost per group in `[start, end)`: what the console's lists of keys
    and teams show, without `usage_summary`'s percentile, which sorts every row of the
    period; by model, key or team from the spend by hour (`metering.hourly`)."""
    only = only or UsageFilter()
    where, params = only.sql(db.dialect)
    column = group_expression(db.dialect, group_by)
    if group_by in _HOURLY_GROUPS and not only.tags:  # sums by hour hold these columns
        keys = group_by == "key" or bool(only.keys)
        source, values = spend_source(start, end, where, params, keys=keys)
        sql = f"SELECT {column}, SUM(requests), SUM(cost_nano) FROM {source} GROUP BY {column}"
    else:
        sql = (
            f"SELECT {column}, COUNT(*), SUM(cost_nano) FROM requests "
            f"WHERE ts >= ? AND ts < ?{where} GROUP BY {column}"
        )
        values = [start, end, *params]
    rows = await db.fetch(sql, values)
    return {
        NO_VALUE if name is None else str(name): Spend(int(count), int(cost or 0))
        for name, count, cost in rows
    }


@dataclass(frozen=True, slots=True)
class TopUsage:
    """The costliest groups, the total of all, and how many groups there are in all."""

    groups: list[UsageGroup]
    total: UsageGroup
    group_count: int


async def top_usage(
    db: Database,
    group_by: GroupBy,
    start: float,
    end: float,
    only: UsageFilter | None = None,
    top: int = 100,
    p95: bool = True,
) -> TopUsage:
    """`usage_summary` cut to the `top` costliest groups in the database, so that a
    grouping with a value per end user (a key or a tag each) answers in a page, not
    with every group."""
    only = only or UsageFilter()
    where, params = only.sql(db.dialect)
    period = (start, end, *params)
    column = group_expression(db.dialect, group_by)
    total = await _total(db, _source(db.dialect, None, start, end, only), where, period, p95)
    source = _source(db.dialect, group_by, start, end, only)
    if group_by in _FEW_VALUED:
        few = await _few_groups(db, column, source, where, period, p95)
        if few is not None and len(few) <= top:  # all of them, in `usage_summary`'s order
            return TopUsage(_costliest_first(few), total, len(few))
    if p95:
        rows = await db.fetch(_summary_sql(column, where, top=True), (*period, top))
    else:
        found = await db.fetch(_TOP_SUMS.format(column=column, source=source[0]), (*source[1], top))
        rows = [(name, *sums, None, count) for name, *sums, count in found]
    # in the database's order, which chose them (its collation breaks the last ties)
    return TopUsage(_groups(rows), total, int(rows[0][-1]) if rows else 0)


@dataclass(frozen=True, slots=True)
class ModelComparison:
    """One model's traffic priced as recorded and on another price list.

    The request, token and cost fields cover the traffic the other list has a price
    for. The rest is counted apart in `unpriced_requests` / `unpriced_actual_nano`, so
    a missing price never reads as $0. `model` is None for the total row.
    """

    model: str | None
    priced_as: tuple[str, ...]
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    actual_nano: int
    compared_nano: int
    unpriced_requests: int
    unpriced_actual_nano: int

    @property
    def priced(self) -> bool:
        return bool(self.priced_as)

    @property
    def savings_nano(self) -> int:
        """Positive when the other list is cheaper for this traffic."""
        return self.actual_nano - self.compared_nano

    @property
    def savings_pct(self) -> float | None:
        if not self.actual_nano:
            return None
        return float(Fraction(100 * self.savings_nano, self.actual_nano))


def _sum_comparisons(model: str | None, parts: list[ModelComparison]) -> ModelComparison:
    return ModelComparison(
        model=model,
        priced_as=tuple(sorted({name for part in parts for name in part.priced_as})),
        requests=sum(p.requests for p in parts),
        input_tokens=sum(p.input_tokens for p in parts),
        cached_input_tokens=sum(p.cached_input_tokens for p in parts),
        output_tokens=sum(p.output_tokens for p in parts),
        actual_nano=sum(p.actual_nano for p in parts),
        compared_nano=sum(p.compared_nano for p in parts),
        unpriced_requests=sum(p.unpriced_requests for p in parts),
        unpriced_actual_nano=sum(p.unpriced_actual_nano for p in parts),
    )


_TRAFFIC_SQL = """SELECT model, upstream, COUNT(*), SUM(input_tokens), SUM(cached_input_tokens),
  SUM(output_tokens), SUM(cost_nano)
FROM requests WHERE ts >= ? AND ts < ? AND cache_hit = 0 GROUP BY model, upstream"""


async def compare_prices(
    db: Database,
    config: GatewayConfig,
    price_list: Mapping[str, Price],
    start: float,
    end: float,
) -> list[ModelComparison]:
    """Price the traffic of `[start, end)` on `price_list`, per model, then a total row.

    Each (model, upstream) is looked up by the upstream's provider model id, then by the
    caller-facing model name (an upstream since removed from the config only has the
    latter). Its token sums are priced once, exactly, with integer unit prices. Response
    cache hits are left out: no provider is paid for them under either list.
    """
    by_model: dict[str, list[ModelComparison]] = {}
    for model, upstream, *sums in await db.fetch(_TRAFFIC_SQL, (start, end)):
        requests, input_tokens, cached, output, actual = (int(v or 0) for v in sums)
        ids = [config.upstreams[upstream].model] if upstream in config.upstreams else []
        entry = next((name for name in [*ids, model] if name in price_list), None)
        if entry is None:
            part = ModelComparison(model, (), 0, 0, 0, 0, 0, 0, requests, actual)
        else:
            prices = UnitPrices.from_price(price_list[entry])
            compared = prices.cost_nano(Usage(input_tokens, cached, output))
            part = ModelComparison(
                model, (entry,), requests, input_tokens, cached, output, actual, compared, 0, 0
            )
        by_model.setdefault(model, []).append(part)
    models = [_sum_comparisons(model, parts) for model, parts in by_model.items()]
    models.sort(
        key=lambda m: (not m.priced, -m.actual_nano, -m.unpriced_actual_nano, m.model or "")
    )
    return [*models, _sum_comparisons(None, models)]


@dataclass(frozen=True, slots=True)
class MonthForecast:
    """Where this month's spend is heading, with the figures the projection came from."""

    month: str
    so_far_nano: int
    daily_nano: int
    basis_days: float
    remaining_days: float
    projected_nano: int


def _midnight(day: dt.date, zone: ZoneInfo) -> float:
    return dt.datetime.combine(day, dt.time(), zone).timestamp()


async def spend_between(db: Database, start: float, end: float) -> int:
    """What the requests of `[start, end)` cost, in nano-USD."""
    source, params = spend_source(start, end)
    rows = await db.fetch(f"SELECT SUM(cost_nano) FROM {source}", params)
    return int(rows[0][0] or 0)


async def month_forecast(db: Database, now: float, tz: str = "UTC") -> MonthForecast:
    """Project this calendar month's spend (months and days are those of `tz`).

    - so far: spend from the first of the month to `now`;
    - daily rate: spend over the last 7 complete days divided by their length, or over
      the complete days of this month when fewer than 7 have passed; on the first of
      the month, which has none, over the part of today elapsed so far; when the ledger
      begins inside those days (a new gateway), from its first request to now, today's
      spend included, and over an hour at least (days before it existed are no data,
      not days without spend);
    - projection: so far + daily rate x days remaining until the next month starts,
      counting the rest of today as the fraction of a day it is.
    Days are measured in seconds / 86400, so a DST-shortened day weighs a little less.
    """
    zone = ZoneInfo(tz)
    today = dt.datetime.fromtimestamp(now, zone).date()
    first = today.replace(day=1)
    month_start = _midnight(first, zone)
    month_end = _midnight((first + dt.timedelta(days=32)).replace(day=1), zone)
    today_start = _midnight(today, zone)
    basis_start = max(_midnight(today - dt.timedelta(days=7), zone), month_start)
    basis_end = today_start if basis_start < today_start else now
    ledger_start = (await db.fetch("SELECT MIN(ts) FROM requests"))[0][0]
    young = ledger_start is not None and float(ledger_start) > basis_start
    if young:
        basis_start, basis_end = float(ledger_start), now

    so_far = await spend_between(db, month_start, now)
    basis = await spend_between(db, basis_start, basis_end)
    basis_seconds = Fraction(basis_end) - Fraction(basis_start)
    if young:
        basis_seconds = max(basis_seconds, Fraction(_HOUR))
    remaining_seconds = Fraction(month_end) - Fraction(now)
    rate = Fraction(basis) / basis_seconds if basis_seconds else Fraction(0)  # nano per s
    return MonthForecast(
        month=first.strftime("%Y-%m"),
        so_far_nano=so_far,
        daily_nano=round(rate * _DAY),
        basis_days=float(basis_seconds / _DAY),
        remaining_days=float(remaining_seconds / _DAY),
        projected_nano=so_far + round(rate * remaining_seconds),
    )
