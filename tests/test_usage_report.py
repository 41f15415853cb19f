"""`metergate usage`: exact figures from known ledger rows, and the command end to end."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metergate.cli.usage import PeriodError, parse_period, usd
from metergate.config import parse_config
from metergate.metering.ledger import LedgerRow, LedgerWriter
from metergate.metering.pricing import load_price_list
from metergate.metering.report import (
    compare_prices,
    month_forecast,
    spend_between,
    spend_by,
    top_usage,
    usage_summary,
)
from metergate.storage import Database, open_database
from tests.services import PostgresServer, running_postgres

METERGATE = [sys.executable, "-m", "metergate"]
NANO = 1_000_000_000
CONFIG = """\
ledger:
  url: {url}
providers:
  openai: {{type: openai, base_url: "https://api.openai.com/v1", api_key: sk-test}}
upstreams:
  openai-gpt41: {{provider: openai, model: gpt-4.1}}
  local: {{provider: openai, model: local-llama}}
models:
  smart: {{upstreams: [openai-gpt41, local]}}
  gpt-4.1: {{upstreams: [openai-gpt41]}}
"""


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


DAY_START = utc(2025, 6, 10)
DAY_END = utc(2025, 6, 11)


def row(ts: float, model: str = "gpt-4.1", **fields: object) -> LedgerRow:
    """A successful 1 ms request without tokens or cost, but for the fields given."""
    blank = LedgerRow(
        ts=ts,
        request_id=f"req-{ts}",
        key_name="svc",
        model=model,
        upstream="openai-gpt41",
        attempts=1,
        input_tokens=0,
        cached_input_tokens=0,
        output_tokens=0,
        cost_nano=0,
        saved_nano=0,
        duration_ms=1.0,
        ttft_ms=None,
        outcome="success",
        status=200,
        cache_hit=0,
        stream=0,
    )
    return blank._replace(**fields)


async def insert(db: Database, rows: list[LedgerRow]) -> None:
    writer = LedgerWriter(db)
    for ledger_row in rows:
        writer.append(ledger_row)
    await writer.flush()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh ledger on each backend: the report SQL must give the same figures on both."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ledger.db"
    else:
        url = request.getfixturevalue("postgres").create_database("usage")
    database = await open_database(url)
    yield database
    await database.close()


def mixed_day() -> list[LedgerRow]:
    """100 gpt-4.1 rows (1..100 ms, 4 errors, 2 refused) and 20 demo rows (10..200 ms)."""
    outcomes = [
        "upstream_error",
        "upstream_rejected",
        "timeout",
        "connection_error",
        "invalid_request",
        "budget_exceeded",
        "cancelled",
    ]
    rows = [
        row(
            DAY_START + i * 60,
            key_name="a" if i % 2 else "b",
            duration_ms=float(101 - i),
            input_tokens=1000,
            cached_input_tokens=100,
            output_tokens=200,
            cost_nano=1000 + i,
            saved_nano=i % 3,
            outcome=outcomes[i - 1] if i <= len(outcomes) else "success",
        )
        for i in range(1, 101)
    ]
    rows += [
        row(
            DAY_START + 3600 + i,
            "demo",
            upstream="sim",
            key_name="a",
            duration_ms=10.0 * i,
            input_tokens=7,
            output_tokens=3,
            cost_nano=5,
        )
        for i in range(1, 21)
    ]
    # just outside the window on each side: [start, end) excludes both
    rows += [row(DAY_START - 0.001, cost_nano=10**12), row(DAY_END, cost_nano=10**12)]
    return rows


async def test_summary_by_model_is_exact(db: Database) -> None:
    await insert(db, mixed_day())
    gpt, demo, total = await usage_summary(db, "model", DAY_START, DAY_END)
    assert gpt.name == "gpt-4.1" and demo.name == "demo" and total.name is None
    assert (gpt.requests, gpt.input_tokens, gpt.cached_input_tokens, gpt.output_tokens) == (
        100,
        100_000,
        10_000,
        20_000,
    )
    assert gpt.cost_nano == 100 * 1000 + sum(range(1, 101))
    assert gpt.saved_nano == sum(i % 3 for i in range(1, 101))
    assert (gpt.errors, gpt.refused) == (4, 2)
    assert gpt.error_rate == 4 / 98  # refused requests are not the service's failures
    assert gpt.p95_ms == 95.0  # nearest rank of 1..100
    assert (demo.requests, demo.cost_nano, demo.errors, demo.error_rate) == (20, 100, 0, 0.0)
    assert demo.p95_ms == 190.0  # rank ceil(0.95 * 20) = 19 of 10..200
    assert (total.requests, total.cost_nano, total.errors, total.refused) == (
        120,
        gpt.cost_nano + 100,
        4,
        2,
    )
    assert total.input_tokens == 100_140 and total.output_tokens == 20_060
    # rank 114 of 1..100 merged with 10..200: 110 values <= 100, then 110, 120, 130, 140
    assert total.p95_ms == 140.0


async def test_summary_by_key_and_by_upstream(db: Database) -> None:
    await insert(db, mixed_day())
    by_key = {g.name: g for g in await usage_summary(db, "key", DAY_START, DAY_END)}
    assert by_key["a"].requests == 50 + 20 and by_key["b"].requests == 50
    assert by_key["a"].cost_nano + by_key["b"].cost_nano == by_key[None].cost_nano
    assert by_key["b"].p95_ms == 95.0  # odd durations 1..99: rank 48 of 50
    by_upstream = await usage_summary(db, "upstream", DAY_START, DAY_END)
    assert [g.name for g in by_upstream] == ["openai-gpt41", "sim", None]


@pytest.mark.parametrize(("count", "expected"), [(1, 1.0), (19, 19.0), (20, 19.0), (101, 96.0)])
async def test_p95_is_nearest_rank(db: Database, count: int, expected: float) -> None:
    await insert(db, [row(DAY_START + i, duration_ms=float(i)) for i in range(count, 0, -1)])
    group, total = await usage_summary(db, "model", DAY_START, DAY_END)
    assert group.p95_ms == total.p95_ms == expected


async def test_the_costliest_groups_are_the_head_of_the_whole_summary(db: Database) -> None:
    """A grouping with a value per end user answers with its costliest groups only: the
    same groups, figures and order as the head of the whole summary, ties broken by
    requests then name, the total and the count of groups still of all of them."""
    rows = []
    for n in range(40):
        cost = (n % 7) * 100  # seven costs, many ties; some groups free
        for i in range(1 + n % 3):  # ties in cost broken by requests, then by name
            rows.append(
                row(
                    DAY_START + n * 10 + i,
                    key_name=f"user-{n:02d}",
                    cost_nano=cost,
                    duration_ms=float(n + i),
                    tags=None if n % 5 == 0 else f'{{"user": "u{n % 11}"}}',
                )
            )
    await insert(db, rows)
    for grouping in ("key", "tag:user", "model"):
        whole = await usage_summary(db, grouping, DAY_START, DAY_END)
        for top in (1, 6, 12, 100):
            page = await top_usage(db, grouping, DAY_START, DAY_END, top=top)
            assert page.groups == whole[:-1][:top], (grouping, top)
            assert page.group_count == len(whole) - 1
            assert page.total == whole[-1]
    empty = await top_usage(db, "key", DAY_END + 1, DAY_END + 2, top=5)
    assert (empty.groups, empty.group_count, empty.total.requests) == ([], 0, 0)


async def test_few_groups_rank_their_p95_as_numbering_every_row_does(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models, upstreams and teams (a few values each) rank each group's p95 from the top
    in a query of its own; the figures must be those of the query that numbers every row,
    the group of requests without a team and filters included."""
    from metergate.metering import report
    from metergate.metering.report import UsageFilter

    await insert(db, mixed_day())
    await insert(
        db,
        [
            row(DAY_START + i, "demo", upstream="sim", team="ads" if i % 3 else None,
                duration_ms=float(i * 7 % 40), cost_nano=i, tags='{"f": "x"}')
            for i in range(1, 40)
        ],
    )  # fmt: skip
    for grouping in ("model", "upstream", "team"):
        for only in (None, UsageFilter(keys=("a", "svc")), UsageFilter(tags=(("f", "x"),))):
            ranked = await usage_summary(db, grouping, DAY_START, DAY_END, only)
            with monkeypatch.context() as patch:
                patch.setattr(report, "_FEW", 0)  # every grouping numbers its rows
                numbered = await usage_summary(db, grouping, DAY_START, DAY_END, only)
            assert ranked == numbered, (grouping, only)
            assert all(g.p95_ms is not None for g in ranked if g.requests)


async def test_spend_by_group_agrees_with_the_whole_summary(db: Database) -> None:
    """The console's key and team lists read requests and cost alone, without the
    percentile: the same figures as the summary's, (none) group and filters included."""
    from metergate.metering.report import UsageFilter

    await insert(db, mixed_day())
    await insert(db, [row(DAY_START + 5, cost_nano=7, team="ads", tags='{"f": "x"}')])
    for grouping in ("model", "key", "team", "tag:f"):
        for only in (None, UsageFilter(keys=("a", "svc"))):
            whole = await usage_summary(db, grouping, DAY_START, DAY_END, only)
            sums = await spend_by(db, grouping, DAY_START, DAY_END, only)
            assert {k: (v.requests, v.cost_nano) for k, v in sums.items()} == {
                g.name: (g.requests, g.cost_nano) for g in whole[:-1]
            }, (grouping, only)
            if only is None:
                assert await spend_between(db, DAY_START, DAY_END) == whole[-1].cost_nano


# Periods whose ends fall inside hours, on an hour's first instant, and a hair off one.
ODD_PERIODS = [
    (DAY_START + 1234.5, DAY_END - 777.25),
    (DAY_START + 3600, DAY_START + 7200),
    (DAY_START + 3599.999, DAY_START + 7200.001),
    (DAY_START + 60.5, DAY_START + 3000),  # inside one hour: the rows alone
]
_ROW_SUMS = """SELECT {column}, COUNT(*), SUM(input_tokens), SUM(cached_input_tokens),
  SUM(output_tokens), SUM(cost_nano), SUM(saved_nano),
  SUM(CASE WHEN outcome IN ('upstream_error', 'upstream_rejected', 'timeout',
    'connection_error', 'gateway_error') THEN 1 ELSE 0 END),
  SUM(CASE WHEN outcome IN ('invalid_request', 'unauthorized', 'rate_limited',
    'budget_exceeded') THEN 1 ELSE 0 END)
FROM requests WHERE ts >= ? AND ts < ? GROUP BY {column}"""


def sums_of(group) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    return (
        group.requests,
        group.input_tokens,
        group.cached_input_tokens,
        group.output_tokens,
        group.cost_nano,
        group.saved_nano,
        group.errors,
        group.refused,
    )


async def test_sums_read_by_hour_equal_the_rows_at_any_period(db: Database) -> None:
    """By model, upstream, team and in total a report sums whole hours from the sums by
    hour and only its period's edges from the rows: every figure equals the rows' own,
    whatever the edges."""
    await insert(db, mixed_day())
    await insert(
        db,
        [
            row(DAY_START + 2000 + i * 97.3, "demo", upstream="sim", team="ads" if i % 2 else None,
                input_tokens=i, output_tokens=2 * i, cost_nano=3 * i, saved_nano=i % 4,
                outcome=("timeout", "rate_limited", "success")[min(i % 9, 2)])
            for i in range(300)
        ],
    )  # fmt: skip
    edges = [DAY_START + hour * 3600 + off for hour in range(1, 5) for off in (-0.001, 0, 0.001)]
    await insert(db, [row(ts, team="ads", cost_nano=11, input_tokens=5) for ts in edges])
    for start, end in ODD_PERIODS:
        for grouping in ("model", "upstream", "team"):
            expected = {
                name: tuple(int(v or 0) for v in sums)
                for name, *sums in await db.fetch(_ROW_SUMS.format(column=grouping), (start, end))
            }
            report = await usage_summary(db, grouping, start, end, p95=False)
            got = {None if g.name == "(none)" else g.name: sums_of(g) for g in report[:-1]}
            assert got == expected, (grouping, start, end)
            totals = [sum(column) for column in zip(*expected.values(), strict=True)]
            assert list(sums_of(report[-1])) == (totals or [0] * 8), (start, end)


async def test_a_report_without_p95_has_the_same_figures(db: Database) -> None:
    """`p95=False` (the console's spend panel) leaves out the percentiles and nothing
    else: every grouping, the costliest groups cut by `top` too."""
    from metergate.metering.report import UsageFilter

    await insert(db, mixed_day())
    await insert(db, [row(DAY_START + 5, cost_nano=7, team="ads", tags='{"f": "x"}')])
    for grouping in ("model", "key", "upstream", "team", "tag:f"):
        for only in (None, UsageFilter(team="ads"), UsageFilter(tags=(("f", "x"),))):
            whole = await usage_summary(db, grouping, DAY_START, DAY_END, only)
            spend = await usage_summary(db, grouping, DAY_START, DAY_END, only, p95=False)
            assert [(g.name, sums_of(g)) for g in spend] == [(g.name, sums_of(g)) for g in whole], (
                grouping,
                only,
            )
            assert all(g.p95_ms is None for g in spend)
            for top in (1, 100):
                page = await top_usage(db, grouping, DAY_START, DAY_END, only, top, p95=False)
                assert [(g.name, sums_of(g)) for g in page.groups] == [
                    (g.name, sums_of(g)) for g in whole[:-1][:top]
                ], (grouping, only, top)
                assert page.group_count == len(whole) - 1
                assert sums_of(page.total) == sums_of(whole[-1])


async def test_empty_period_has_a_zero_total(db: Database) -> None:
    await insert(db, mixed_day())
    [total] = await usage_summary(db, "model", DAY_END + 1, DAY_END + 2)
    assert (total.name, total.requests, total.cost_nano) == (None, 0, 0)
    assert total.p95_ms is None and total.error_rate is None


async def test_compare_reproduces_the_seed_table(db: Database) -> None:
    """10M tokens of gpt-4.1: $150 on seed-direct, $80 on holysheep, 46.7% saved."""
    config = parse_config(CONFIG.format(url="sqlite:///unused.db"))
    seed_cost = 15 * NANO  # 1M tokens at $15/M, as recorded by a seed-direct deployment
    await insert(
        db,
        [
            *(
                row(
                    DAY_START + i,
                    "smart",
                    input_tokens=800_000,
                    cached_input_tokens=100_000,
                    output_tokens=100_000,
                    cost_nano=seed_cost,
                )
                for i in range(10)
            ),
            row(DAY_START + 20, "smart", upstream="local", input_tokens=5, cost_nano=77),
            row(
                DAY_START + 30,
                "deepseek-chat",
                upstream="retired",
                input_tokens=10**6,
                cost_nano=NANO,
            ),
            row(DAY_START + 40, "smart", input_tokens=10**6, cache_hit=1),
            row(DAY_START + 50, "demo", upstream="sim", cost_nano=3),
        ],
    )
    smart, deepseek, demo, total = await compare_prices(
        db, config, load_price_list("holysheep"), DAY_START, DAY_END
    )
    # priced by the upstream's provider model id; the cache hit is not counted
    assert (smart.model, smart.priced_as, smart.requests) == ("smart", ("gpt-4.1",), 10)
    assert smart.input_tokens + smart.cached_input_tokens + smart.output_tokens == 10**7
    assert (smart.actual_nano, smart.compared_nano, smart.savings_nano) == (
        150 * NANO,
        80 * NANO,
        70 * NANO,
    )
    assert round(smart.savings_pct, 1) == 46.7
    # the local upstream has no holysheep price: kept apart, never priced at $0
    assert (smart.unpriced_requests, smart.unpriced_actual_nano) == (1, 77)
    # an upstream gone from the config falls back to the caller-facing model name
    assert deepseek.priced_as == ("deepseek-chat",)
    assert (deepseek.compared_nano, deepseek.savings_nano) == (420_000_000, 580_000_000)
    assert (demo.model, demo.priced, demo.requests, demo.unpriced_requests) == ("demo", False, 0, 1)
    assert (demo.savings_pct, demo.unpriced_actual_nano) == (None, 3)
    assert total.model is None and total.requests == 11 and total.unpriced_requests == 2
    assert (total.actual_nano, total.compared_nano) == (151 * NANO, 80_420_000_000)


async def test_forecast_mid_month_uses_last_seven_complete_days(db: Database) -> None:
    rows = [row(utc(2025, 6, day, 12), cost_nano=day * NANO) for day in range(1, 10)]
    rows += [row(utc(2025, 6, 10, 6), cost_nano=5 * NANO), row(utc(2025, 5, 31), cost_nano=NANO)]
    await insert(db, rows)
    forecast = await month_forecast(db, utc(2025, 6, 10, 12))
    assert forecast.month == "2025-06"
    assert forecast.so_far_nano == (45 + 5) * NANO
    assert forecast.daily_nano == 6 * NANO  # June 3..9: 42 / 7
    assert (forecast.basis_days, forecast.remaining_days) == (7.0, 20.5)
    assert forecast.projected_nano == (50 + 6 * 20.5) * NANO


async def test_forecast_early_month_uses_the_days_it_has(db: Database) -> None:
    rows = [row(utc(2025, 6, day, 12), cost_nano=day * NANO) for day in (1, 2, 3)]
    rows += [row(utc(2025, 6, 4, 1), cost_nano=NANO), row(utc(2025, 5, 30), cost_nano=99 * NANO)]
    await insert(db, rows)
    forecast = await month_forecast(db, utc(2025, 6, 4, 6))
    assert (forecast.so_far_nano, forecast.daily_nano, forecast.basis_days) == (
        7 * NANO,
        2 * NANO,
        3.0,
    )
    assert forecast.projected_nano == 7 * NANO + 2 * NANO * 26.75
    first = await month_forecast(db, utc(2025, 7, 1, 6))  # no complete day yet: today so far
    assert (first.month, first.so_far_nano, first.basis_days) == ("2025-07", 0, 0.25)
    await insert(db, [row(utc(2025, 7, 1, 3), cost_nano=NANO)])
    first = await month_forecast(db, utc(2025, 7, 1, 6))
    assert (first.daily_nano, first.projected_nano) == (4 * NANO, NANO + 4 * NANO * 30.75)


async def test_forecast_months_follow_the_time_zone(db: Database) -> None:
    forecast = await month_forecast(db, utc(2025, 6, 30, 23, 30), tz="Europe/Berlin")
    assert forecast.month == "2025-07"


def test_periods() -> None:
    now = utc(2025, 6, 10, 12)
    assert parse_period(None, None, None, now) == (now - 86_400, now)
    assert parse_period("30m", None, None, now) == (now - 1800, now)
    assert parse_period("7d", None, None, now) == (now - 7 * 86_400, now)
    assert parse_period(None, "2025-06-01", "2025-06-02", now) == (utc(2025, 6, 1), utc(2025, 6, 3))
    assert parse_period(None, "2025-06-01T02:00+02:00", "2025-06-01T06:30", now) == (
        utc(2025, 6, 1),
        utc(2025, 6, 1, 6, 30),
    )
    assert parse_period(None, "2025-06-10T06:00", None, now) == (utc(2025, 6, 10, 6), now)
    for since in ("24", "h", "1.5h", "-1h", "0h", "2w"):
        with pytest.raises(PeriodError, match="--since takes a number and a unit"):
            parse_period(since, None, None, now)
    for args, message in [
        (("1h", "2025-06-01", None), "not both"),
        ((None, None, "2025-06-01"), "--to needs --from"),
        ((None, "2025-06-02", "2025-06-01T12:00"), "before"),
        ((None, "June 1st", None), "--from takes an ISO date"),
    ]:
        with pytest.raises(PeriodError, match=message):
            parse_period(*args, now)


def test_a_period_beyond_the_calendar_is_refused(tmp_path: Path) -> None:
    """Further back than the year 1 (or past 9999) no date can show it: a usage error, not
    a ValueError from datetime or an OverflowError from a huge number."""
    now = utc(2025, 6, 10, 12)
    for since in ("1000000d", "999999999999m", "9" * 40 + "d", "9" * 5000 + "h"):
        with pytest.raises(PeriodError, match="reaches back before the year 1"):
            parse_period(since, None, None, now)
    assert parse_period("700000d", None, None, now)[0] == now - 700_000 * 86_400
    for start, end in [
        ("2020-01-01", "9999-12-31"),  # a bare --to date ends at the next midnight
        ("0001-01-01T00:00+05:00", None),
        ("2020-01-01", "9999-12-31T23:00-05:00"),
    ]:
        with pytest.raises(PeriodError, match="out of range"):
            parse_period(None, start, end, now)
    (tmp_path / "gw.yaml").write_text(CONFIG.format(url=f"sqlite:///{tmp_path}/cli.db"))
    result = run(tmp_path, "--since", "1000000d")
    assert result.returncode == 2 and "reaches back before the year 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_usd_is_exact() -> None:
    assert usd(0) == "0.000000000"
    assert usd(150 * NANO + 7) == "150.000000007"
    assert usd(-1) == "-0.000000001"
    assert usd(10**19 + 1) == "10000000000.000000001"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [*METERGATE, "usage", "--config", str(tmp_path / "gw.yaml"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
async def ledger_config(tmp_path: Path) -> Path:
    url = f"sqlite:///{tmp_path}/cli.db"
    (tmp_path / "gw.yaml").write_text(CONFIG.format(url=url))
    database = await open_database(url)
    now = time.time()
    await insert(
        database,
        [
            *(
                row(
                    now - 3600 + i,
                    "smart",
                    input_tokens=10**6,
                    cost_nano=15 * NANO,
                    duration_ms=float(i + 1),
                )
                for i in range(10)
            ),
            row(now - 600, "demo", upstream="sim", cost_nano=123, outcome="timeout"),
            row(now - 2 * 86_400, "smart", cost_nano=10**12),  # outside --since 24h
        ],
    )
    await database.close()
    return tmp_path


def test_cli_json(ledger_config: Path) -> None:
    result = run(ledger_config, "--format", "json", "--compare", "holysheep")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["period"]["by"] == "model"
    smart, demo = report["groups"]
    assert (smart["name"], smart["requests"], smart["cost_usd"]) == ("smart", 10, "150.000000000")
    assert (smart["p95_ms"], smart["error_rate"]) == (10.0, 0.0)
    assert (demo["cost_usd"], demo["errors"], demo["error_rate"]) == ("0.000000123", 1, 1.0)
    assert report["total"]["cost_usd"] == "150.000000123" and report["total"]["requests"] == 11
    comparison = report["comparison"]
    assert comparison["price_list"] == "holysheep"
    assert comparison["models"][0]["compared_usd"] == "80.000000000"
    assert comparison["models"][0]["savings_pct"] == 46.67
    assert comparison["models"][1]["compared_usd"] is None  # demo: not priced
    assert comparison["total"]["savings_usd"] == "70.000000000"
    forecast = report["forecast"]
    assert set(forecast) == {
        "month",
        "so_far_usd",
        "daily_usd",
        "basis_days",
        "remaining_days",
        "projected_usd",
    }
    assert len(forecast["projected_usd"].split(".")[1]) == 9


def test_cli_csv_and_period_options(ledger_config: Path) -> None:
    result = run(ledger_config, "--format", "csv", "--by", "upstream", "--since", "7d")
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:2] == ["upstream", "requests"] and "cost_usd" in rows[0]
    cost = rows[0].index("cost_usd")
    assert [(r[0], r[1], r[cost]) for r in rows[1:]] == [
        ("openai-gpt41", "11", "1150.000000000"),
        ("sim", "1", "0.000000123"),
        ("", "12", "1150.000000123"),
    ]
    assert "month-end forecast" in result.stderr
    today = dt.datetime.now(dt.UTC).date()
    old = run(ledger_config, "--format", "csv", "--from", "2000-01-01", "--to", "2000-01-31")
    assert old.returncode == 0 and old.stdout.splitlines()[1].startswith(",0,")
    compared = run(
        ledger_config,
        "--format",
        "csv",
        "--compare",
        "seed-direct",
        "--from",
        (today - dt.timedelta(days=3)).isoformat(),
    )
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.splitlines()[0].startswith("model,priced_as,requests")


async def test_cli_csv_cells_never_run_as_formulas(tmp_path: Path) -> None:
    """Key names and tag values come from callers; a spreadsheet must show them as text.
    Numbers the report writes itself (a negative saving) stay numbers."""
    url = f"sqlite:///{tmp_path}/cli.db"
    (tmp_path / "gw.yaml").write_text(CONFIG.format(url=url))
    database = await open_database(url)
    evil = '=HYPERLINK("http://x")'
    tags = json.dumps({"team": "+1+1", "who": "@SUM(A1)"})
    await insert(
        database,
        [row(time.time() - 60, key_name=evil, tags=tags, cost_nano=5, saved_nano=-7)],
    )
    await database.close()
    by_key = list(csv.reader(io.StringIO(run(tmp_path, "--format", "csv", "--by", "key").stdout)))
    assert by_key[1][0] == "'" + evil
    assert by_key[1][by_key[0].index("saved_usd")] == "-0.000000007"
    for name, value in (("team", "+1+1"), ("who", "@SUM(A1)")):
        result = run(tmp_path, "--format", "csv", "--by", f"tag:{name}")
        assert list(csv.reader(io.StringIO(result.stdout)))[1][0] == "'" + value


def test_cli_table(ledger_config: Path) -> None:
    result = run(ledger_config, "--compare", "holysheep", "--by", "key")
    assert result.returncode == 0, result.stderr
    for text in (
        "usage by key",
        "$150.000000",
        "on holysheep",
        "$70.000000",
        "not priced",
        "month-end forecast",
    ):
        assert text in result.stdout


def test_cli_shows_the_costliest_groups_and_sums_the_rest(ledger_config: Path) -> None:
    """A table stops at --top (100 by default: a key per user is many groups) and says
    what the rest spent; csv and json keep every group unless --top is given."""
    table = run(ledger_config, "--top", "1")
    assert table.returncode == 0, table.stderr
    assert "smart" in table.stdout and "demo" not in table.stdout
    assert "and 1 more group, $0.000000 together" in table.stdout
    whole = run(ledger_config)
    assert "demo" in whole.stdout and "more groups" not in whole.stdout
    report = json.loads(run(ledger_config, "--format", "json", "--top", "1").stdout)
    assert [g["name"] for g in report["groups"]] == ["smart"]
    assert report["total"]["requests"] == 11  # the total is of every group
    assert report["group_count"] == 2  # and how many groups there are in all
    assert json.loads(run(ledger_config, "--format", "json").stdout)["group_count"] == 2
    every = run(ledger_config, "--format", "csv").stdout.splitlines()
    assert len(every) == 1 + 2 + 1  # header, both groups, total


def test_cli_without_p95_reports_the_same_figures(ledger_config: Path) -> None:
    exact = json.loads(run(ledger_config, "--format", "json").stdout)
    spend = json.loads(run(ledger_config, "--format", "json", "--no-p95").stdout)
    assert exact["total"]["p95_ms"] is not None
    assert all(g["p95_ms"] is None for g in (*spend["groups"], spend["total"]))
    for group in (*exact["groups"], exact["total"]):
        group["p95_ms"] = None
    for report in (exact, spend):
        del report["period"], report["forecast"]  # of each run's own `now`
    assert spend == exact


def test_cli_compares_with_a_price_file(ledger_config: Path) -> None:
    (ledger_config / "contract.yaml").write_text("gpt-4.1: {input: 1.5, output: 6}\n")
    result = run(ledger_config, "--format", "json", "--compare", "contract.yaml")
    assert result.returncode == 0, result.stderr
    smart = json.loads(result.stdout)["comparison"]["models"][0]
    assert (smart["compared_usd"], smart["savings_pct"]) == ("15.000000000", 90.0)
    (ledger_config / "broken.yaml").write_text("gpt-4.1: {input: cheap}\n")
    broken = run(ledger_config, "--compare", "broken.yaml")
    assert broken.returncode == 2 and "must map model ids" in broken.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since takes a number and a unit: 30m, 24h, 7d"),
        (["--since", "1h", "--from", "2025-06-01"], "use either --since or --from/--to"),
        (["--compare", "no-such-list"], "unknown price list 'no-such-list'"),
    ],
)
def test_cli_bad_options_exit_2(ledger_config: Path, args: list[str], message: str) -> None:
    result = run(ledger_config, *args)
    assert result.returncode == 2
    assert message in result.stderr


async def test_groups_and_filters_by_team_and_tag_on_both_backends(db: Database) -> None:
    from metergate.metering.report import NO_VALUE, UnknownGrouping, UsageFilter

    tagged = '{"feature": "rerank", "team.name": "x"}'
    await insert(
        db,
        [
            row(DAY_START + 1, cost_nano=10, team="search", tags=tagged),
            row(DAY_START + 2, cost_nano=20, team="search", tags='{"feature": "chat"}'),
            row(DAY_START + 3, cost_nano=40, team="ads", tags=tagged),
            row(DAY_START + 4, cost_nano=80),  # no team, no tags
        ],
    )
    by_team = {g.name: g.cost_nano for g in await usage_summary(db, "team", DAY_START, DAY_END)}
    assert by_team == {"search": 30, "ads": 40, NO_VALUE: 80, None: 150}
    by_tag = {
        g.name: g.requests for g in await usage_summary(db, "tag:feature", DAY_START, DAY_END)
    }
    assert by_tag == {"rerank": 2, "chat": 1, NO_VALUE: 1, None: 4}
    dotted = await usage_summary(db, "tag:team.name", DAY_START, DAY_END)
    assert {g.name: g.requests for g in dotted} == {"x": 2, NO_VALUE: 2, None: 4}
    only = UsageFilter(team="search", tags=(("feature", "rerank"),))
    (group, total) = await usage_summary(db, "key", DAY_START, DAY_END, only)
    assert (group.name, group.cost_nano, total.cost_nano) == ("svc", 10, 10)
    with pytest.raises(UnknownGrouping):
        await usage_summary(db, "tag:it's", DAY_START, DAY_END)
