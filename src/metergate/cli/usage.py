"""`metergate usage`: spend, tokens, reliability and latency from the ledger.

Tables are for people; `--format csv|json` is for scripts, on stdout alone, with money
as exact decimal USD strings (nine decimals, straight from the ledger's nano-USD
integers, never through a float).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from rich.table import Table

from metergate.cli.common import ConfigOption, console, errors, load_for_ledger, with_database
from metergate.config.model import Price
from metergate.metering.pricing import load_price_list, shipped_price_lists
from metergate.metering.report import (
    GroupBy,
    ModelComparison,
    MonthForecast,
    UnknownGrouping,
    UsageFilter,
    UsageGroup,
    compare_prices,
    csv_text,
    group_expression,
    month_forecast,
    tag_expression,
    top_usage,
    usage_summary,
)
from metergate.storage.database import Database

Format = Literal["table", "csv", "json"]
# the groups then the total, how many groups in all (when cut), the comparison, forecast
Report = tuple[list[UsageGroup], int | None, list[ModelComparison] | None, MonthForecast]

_SINCE = re.compile(r"([1-9][0-9]*)([mhd])")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86_400}
_NANO = 1_000_000_000
_FIRST_DAY = dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp()  # the earliest a report shows
TABLE_TOP = 100  # groups a table shows unless --top says otherwise: a key per user is many


def usage(
    since: Annotated[
        str | None, typer.Option("--since", help="period ending now: 30m, 24h, 7d; 24h by default")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="period start, ISO date or date-time (UTC unless offset)"),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            "--to", help="period end, exclusive, now by default; a bare date includes its day"
        ),
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="group rows by model, key, upstream, team or tag:NAME")
    ] = "model",
    team: Annotated[str | None, typer.Option("--team", help="only this team's requests")] = None,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="NAME=VALUE", help="only requests with this tag (repeat)"),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="csv/json: machine-readable")] = "table",
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            min=1,
            help="only the N costliest groups, the total still of all (a table: 100; "
            "csv and json: every group)",
        ),
    ] = None,
    p95: Annotated[
        bool,
        typer.Option(
            "--p95/--no-p95",
            help="latency p95 per group (ranks every request of the period: seconds at a "
            "month of a busy ledger; --no-p95 reads spend and counts from the sums by hour)",
        ),
    ] = True,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            metavar="PRICELIST",
            help="also price the same traffic on a shipped list "
            f"({', '.join(shipped_price_lists())}) or a YAML file",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Report usage per model, key, upstream, team or request tag (`--by tag:team`), with
    a month-end spend forecast.

    Errors are upstream/provider failures; their rate leaves out requests refused
    because of the caller (invalid, unauthorized, rate-limited, over budget), which are
    counted apart. p95 latency is nearest-rank over every request of the group
    (--no-p95 leaves it out, for a faster report of spend). With
    --format csv the total row has an empty group cell, --compare makes the CSV the
    comparison table, and the forecast goes to stderr.
    """
    now = time.time()
    period = _period_or_exit(since, start, end, now)
    only = _filter_or_exit(by, team, tags or [])
    loaded = load_for_ledger(config)
    prices = None if compare is None else _price_list_or_exit(compare)

    shown = top if top is not None or fmt != "table" else TABLE_TOP

    async def gather(db: Database) -> Report:
        group_count: int | None = None
        if shown is None:
            summary = await usage_summary(db, by, *period, only, p95)
        else:
            cut = await top_usage(db, by, *period, only, shown, p95)
            summary, group_count = [*cut.groups, cut.total], cut.group_count
        comparison = None
        if prices is not None:
            comparison = await compare_prices(db, loaded, prices, *period)
        return summary, group_count, comparison, await month_forecast(db, now)

    summary, group_count, comparison, forecast = with_database(loaded, gather)
    if fmt == "json":
        report = _json(by, period, summary, compare, comparison, forecast)
        report["group_count"] = len(summary) - 1 if group_count is None else group_count
        print(json.dumps(report, indent=2))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        if comparison is None:
            writer.writerows(_usage_csv(by, summary))
        else:
            writer.writerows(_comparison_csv(comparison))
        errors.print(_forecast_line(forecast), markup=False, highlight=False)
    else:
        console.print(_usage_table(by, period, summary))
        if group_count is not None and group_count > len(summary) - 1:
            rest = summary[-1].cost_nano - sum(g.cost_nano for g in summary[:-1])
            more = group_count - len(summary) + 1
            console.print(
                f"and {more:,} more {'group' if more == 1 else 'groups'}, {_money(rest)} "
                "together; --top N or --format csv for all",
                highlight=False,
            )
        if comparison is not None and compare is not None:
            _print_comparison(compare, comparison)
        console.print(_forecast_line(forecast), highlight=False)


class PeriodError(ValueError):
    """A period the operator wrote in a way we cannot read; the message says how to."""


def parse_period(
    since: str | None, start: str | None, end: str | None, now: float
) -> tuple[float, float]:
    """`[start, end)` in epoch seconds from either --since or --from/--to."""
    if since is not None and (start is not None or end is not None):
        raise PeriodError("use either --since or --from/--to, not both")
    if start is None:
        if end is not None:
            raise PeriodError("--to needs --from")
        match = _SINCE.fullmatch((since or "24h").strip())
        if match is None:
            raise PeriodError(f"--since takes a number and a unit: 30m, 24h, 7d (got {since!r})")
        # 13 digits are already millions of years; int() refuses above 4,300 digits
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if len(match[1]) < 13 else None
        if seconds is None or seconds > now - _FIRST_DAY:
            raise PeriodError(
                f"--since {since} reaches back before the year 1; give a shorter period, "
                "or --from DATE"
            )
        return now - seconds, now
    period = _instant(start, "--from"), now if end is None else _instant(end, "--to")
    if period[0] >= period[1]:
        raise PeriodError("--from must be before --to (or before now)")
    return period


def _instant(text: str, option: str) -> float:
    """Epoch seconds of an ISO date or date-time; a bare date --to means the day's end."""
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        pass
    else:
        midnight = dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()
        return _checked(midnight + (86_400 if option == "--to" else 0), option, text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PeriodError(
            f"{option} takes an ISO date or date-time, e.g. 2025-06-01 or "
            f"2025-06-01T09:30+02:00 (got {text!r})"
        ) from None
    aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return _checked(aware.timestamp(), option, text)


def _checked(ts: float, option: str, text: str) -> float:
    if not _in_range(ts):
        raise PeriodError(
            f"{option} {text} is out of range: a period lies within the years 1-9999 (UTC)"
        )
    return ts


def _in_range(ts: float) -> bool:
    """Whether a report can show this instant as a UTC date (years 1-9999)."""
    try:
        dt.datetime.fromtimestamp(ts, dt.UTC)
    except (ValueError, OverflowError, OSError):
        return False
    return True


def _period_or_exit(
    since: str | None, start: str | None, end: str | None, now: float
) -> tuple[float, float]:
    try:
        return parse_period(since, start, end, now)
    except PeriodError as error:
        errors.print(str(error), markup=False, highlight=False)
        raise typer.Exit(2) from None


def _filter_or_exit(by: str, team: str | None, tags: list[str]) -> UsageFilter:
    """Check --by and the filters before anything is opened."""
    pairs = []
    try:
        group_expression("sqlite", by)
        for item in tags:
            name, sep, value = item.partition("=")
            if not sep or not value:
                raise UnknownGrouping(f"--tag takes NAME=VALUE (got {item!r})")
            tag_expression("sqlite", name)
            pairs.append((name, value))
    except UnknownGrouping as error:
        errors.print(str(error), markup=False, highlight=False)
        raise typer.Exit(2) from None
    return UsageFilter(team, tuple(pairs))


def _price_list_or_exit(name_or_path: str) -> dict[str, Price]:
    try:
        return load_price_list(name_or_path)
    except FileNotFoundError:
        shipped = ", ".join(shipped_price_lists())
        message = f"unknown price list {name_or_path!r}: not a shipped list ({shipped}) or a file"
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        message = (
            f"price list {name_or_path} must map model ids to "
            f"{{input, cached_input, output}} USD per million tokens: {error}"
        )
    errors.print(message, markup=False, highlight=False)
    raise typer.Exit(2)


def usd(nano: int) -> str:
    """Exact decimal USD, nine places, from integer nano-USD."""
    whole, fraction = divmod(abs(nano), _NANO)
    return f"{'-' if nano < 0 else ''}{whole}.{fraction:09d}"


def _money(nano: int) -> str:
    """USD for people: to the micro-dollar, with thousands separators."""
    return f"{'-' if nano < 0 else ''}${Decimal(abs(nano)).scaleb(-9):,.6f}"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _rounded(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)


def _group_fields(group: UsageGroup) -> dict[str, Any]:
    return {
        "requests": group.requests,
        "input_tokens": group.input_tokens,
        "cached_input_tokens": group.cached_input_tokens,
        "output_tokens": group.output_tokens,
        "cost_usd": usd(group.cost_nano),
        "saved_usd": usd(group.saved_nano),
        "errors": group.errors,
        "refused": group.refused,
        "error_rate": _rounded(group.error_rate, 6),
        "p95_ms": _rounded(group.p95_ms, 3),
    }


def _comparison_fields(row: ModelComparison) -> dict[str, Any]:
    return {
        "priced_as": list(row.priced_as),
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "output_tokens": row.output_tokens,
        "actual_usd": usd(row.actual_nano),
        "compared_usd": usd(row.compared_nano) if row.priced else None,
        "savings_usd": usd(row.savings_nano) if row.priced else None,
        "savings_pct": _rounded(row.savings_pct, 2),
        "unpriced_requests": row.unpriced_requests,
        "unpriced_actual_usd": usd(row.unpriced_actual_nano),
    }


def _forecast_fields(forecast: MonthForecast) -> dict[str, Any]:
    return {
        "month": forecast.month,
        "so_far_usd": usd(forecast.so_far_nano),
        "daily_usd": usd(forecast.daily_nano),
        "basis_days": round(forecast.basis_days, 4),
        "remaining_days": round(forecast.remaining_days, 4),
        "projected_usd": usd(forecast.projected_nano),
    }


def _json(
    by: GroupBy,
    period: tuple[float, float],
    summary: list[UsageGroup],
    compare: str | None,
    comparison: list[ModelComparison] | None,
    forecast: MonthForecast,
) -> dict[str, Any]:
    *groups, total = summary
    report: dict[str, Any] = {
        "period": {"from": _iso(period[0]), "to": _iso(period[1]), "by": by},
        "groups": [{"name": group.name, **_group_fields(group)} for group in groups],
        "total": _group_fields(total),
    }
    if comparison is not None:
        *models, compared_total = comparison
        report["comparison"] = {
            "price_list": compare,
            "models": [{"model": row.model, **_comparison_fields(row)} for row in models],
            "total": _comparison_fields(compared_total),
        }
    report["forecast"] = _forecast_fields(forecast)
    return report


def _usage_csv(by: GroupBy, summary: list[UsageGroup]) -> list[list[Any]]:
    header = [by, *_group_fields(summary[-1])]
    rows = [[csv_text(group.name or ""), *_group_fields(group).values()] for group in summary]
    return [header, *([("" if v is None else v) for v in row] for row in rows)]


def _comparison_csv(comparison: list[ModelComparison]) -> list[list[Any]]:
    header = ["model", *_comparison_fields(comparison[-1])]
    rows: list[list[Any]] = []
    for row in comparison:
        fields = _comparison_fields(row)
        fields["priced_as"] = csv_text(" ".join(row.priced_as))
        rows.append([csv_text(row.model or ""), *("" if v is None else v for v in fields.values())])
    return [header, *rows]


def _usage_table(by: GroupBy, period: tuple[float, float], summary: list[UsageGroup]) -> Table:
    start, end = (
        dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") for ts in period
    )
    table = Table(
        by,
        "requests",
        "input",
        "cached",
        "output",
        "cost",
        "saved",
        "errors",
        "error %",
        "refused",
        "p95 ms",
        title=f"usage by {by}, {start} → {end} UTC",
    )
    for column in table.columns[1:]:
        column.justify = "right"
    for group in summary:
        rate = group.error_rate
        if group.name is None:
            table.add_section()
        table.add_row(
            group.name or "total",
            f"{group.requests:,}",
            f"{group.input_tokens:,}",
            f"{group.cached_input_tokens:,}",
            f"{group.output_tokens:,}",
            _money(group.cost_nano),
            _money(group.saved_nano),
            f"{group.errors:,}",
            "" if rate is None else f"{100 * rate:.1f}",
            f"{group.refused:,}",
            "" if group.p95_ms is None else f"{group.p95_ms:,.1f}",
            style="bold" if group.name is None else None,
        )
    return table


def _print_comparison(compare: str, comparison: list[ModelComparison]) -> None:
    name = Path(compare).stem if compare not in shipped_price_lists() else compare
    table = Table(
        "model",
        "priced as",
        "requests",
        "tokens",
        "actual",
        f"on {name}",
        "savings",
        "savings %",
        "not priced",
        title=f"actual cost vs price list {compare}",
    )
    for column in table.columns[2:]:
        column.justify = "right"
    for row in comparison:
        if row.model is None:
            table.add_section()
        tokens = row.input_tokens + row.cached_input_tokens + row.output_tokens
        pct = row.savings_pct
        priced = [
            f"{row.requests:,}",
            f"{tokens:,}",
            _money(row.actual_nano),
            _money(row.compared_nano),
            _money(row.savings_nano),
            "" if pct is None else f"{pct:.1f}",
        ]
        table.add_row(
            row.model or "total",
            "" if row.model is None else ", ".join(row.priced_as) or "not priced",
            *(priced if row.priced else [""] * len(priced)),
            f"{row.unpriced_requests:,} req, {_money(row.unpriced_actual_nano)}"
            if row.unpriced_requests
            else "",
            style="bold" if row.model is None else None,
        )
    console.print(table)
    if comparison[-1].unpriced_requests:
        console.print(
            f"requests under 'not priced' have no price in {compare} and are left out of "
            "the actual / compared columns"
        )


def _forecast_line(forecast: MonthForecast) -> str:
    return (
        f"month-end forecast {forecast.month} (UTC): {_money(forecast.projected_nano)} = "
        f"{_money(forecast.so_far_nano)} so far + {_money(forecast.daily_nano)}/day x "
        f"{forecast.remaining_days:.2f} days left (daily rate over the last "
        f"{forecast.basis_days:.2f} days)"
    )
