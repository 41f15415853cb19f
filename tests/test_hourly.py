"""The spend by hour (`metering.hourly`) that budgets, the forecast and the console
sum: for any period, on SQLite and on PostgreSQL, its sums are the ledger rows' sums to
the nano-dollar, however the period's ends fall against the hours, after a migration
filled it from older rows, and when a commit's answer was lost and the batch retried."""

# ruff: noqa: F811 - test parameters named like the fixtures imported from tests.services

from __future__ import annotations

import asyncio
import math
import random

import pytest

from metergate.budgets.budget import Budget, ledger_spend
from metergate.budgets.each import EachBudget, ledger_count_each, ledger_spend_each
from metergate.config.model import BudgetConfig
from metergate.console.long_windows import long_window
from metergate.console.windows import WINDOWS
from metergate.metering.hourly import USAGE_SUMS, HourSums
from metergate.metering.ledger import COLUMNS, LedgerRow, LedgerWriter
from metergate.metering.report import (
    ERROR_OUTCOMES,
    REFUSED_OUTCOMES,
    UsageFilter,
    spend_between,
    spend_by,
)
from metergate.storage.database import Database, open_database
from metergate.storage.migrations import migrate
from tests.services import (  # noqa: F401 - fixtures, also when conftest.py lacks them
    PostgresServer,
    fresh_postgres_url,
    postgres_server,
)
from tests.test_ledger import RecordingDatabase, database, wait_for  # noqa: F401 - a fixture

HOUR = 3600.0
EPOCH = 1_764_547_200.0  # 2025-12-01 00:00 UTC: an hour's start
KEYS = ("alice", "bob", "carol", "dave")
TEAMS = ("search", "support", None)
MODELS = ("small", "large")
OUTCOMES = ("success", "success", "success", "upstream_error", "rate_limited")
UPSTREAMS = ("up-a", "up-b")


def ledger_rows(count: int, seed: int = 3) -> list[LedgerRow]:
    """Rows over 30 hours, a few on an hour's start and a hair before it, with costs
    whose sums a float could not hold."""
    rng = random.Random(seed)
    times = [EPOCH + rng.uniform(0, 30 * HOUR) for _ in range(count)]
    for hour in range(1, 30, 3):  # the edges an hour's sum must get right
        times += [EPOCH + hour * HOUR, math.nextafter(EPOCH + hour * HOUR, 0)]
    rows = []
    for n, ts in enumerate(sorted(times)):
        key = rng.choice(KEYS)
        rows.append(
            LedgerRow(
                ts=ts,
                request_id=f"req-{n}",
                key_name=key,
                model=rng.choice(MODELS),
                upstream=rng.choice(UPSTREAMS),
                attempts=rng.choice((1, 1, 1, 2, 3)),
                input_tokens=10,
                cached_input_tokens=0,
                output_tokens=5,
                cost_nano=2**44 + rng.randrange(0, 10**9) if n % 7 else 0,  # sums past 2**53
                saved_nano=0,
                duration_ms=rng.lognormvariate(5, 1.5) if n % 50 else 0.0,
                ttft_ms=rng.lognormvariate(4, 1) if n % 3 else None,
                outcome=rng.choice(OUTCOMES),
                status=200,
                cache_hit=0,
                stream=0,
                team=TEAMS[KEYS.index(key) % 3],
            )
        )
    return rows


async def raw_sums(database: Database, column: str, start: float, end: float) -> dict:
    rows = await database.fetch(
        f"SELECT {column}, COUNT(*), SUM(cost_nano) FROM requests "
        f"WHERE ts >= ? AND ts < ? GROUP BY {column}",
        (start, end),
    )
    return {name: (int(count), int(cost)) for name, count, cost in rows}


def periods(rng: random.Random, count: int) -> list[tuple[float, float]]:
    """Periods within, around and across the rows' hours: ends on an hour's start, a
    hair either side of it, or anywhere; some shorter than an hour."""

    def point() -> float:
        hour = EPOCH + rng.randrange(-2, 33) * HOUR
        return rng.choice(
            [
                hour,
                math.nextafter(hour, 0),
                math.nextafter(hour, math.inf),
                hour + rng.uniform(0, HOUR),
            ]
        )

    found = []
    while len(found) < count:
        start, end = sorted((point(), point()))
        if rng.random() < 0.2:
            end = start + rng.uniform(0, HOUR)
        found.append((start, end))
    return found


async def assert_tables_hold_the_rows_sums(database: Database) -> None:
    """Every hour's sums, counts and latency bins are those of its rows."""
    stored = await database.fetch(f"SELECT {', '.join(COLUMNS)} FROM requests")
    expected = HourSums(LedgerRow(*row) for row in stored)
    tables = {
        "key_spend_hours": ("hour, key_name, team, model", "requests, cost_nano"),
        "usage_hours": ("hour, team, model, upstream, outcome", ", ".join(USAGE_SUMS)),
        "latency_hours": ("hour, model, upstream, kind, bin", "requests"),
    }
    found = {}
    for table, (group, sums) in tables.items():
        width = group.count(",") + 1
        rows = await database.fetch(f"SELECT {group}, {sums} FROM {table}")
        found[table] = {tuple(row[:width]): [int(v) for v in row[width:]] for row in rows}
    assert found["key_spend_hours"] == expected.keys
    assert found["usage_hours"] == expected.usage
    assert found["latency_hours"] == {group: [n] for group, n in expected.latency.items()}


async def assert_sums_match(database: Database, rng: random.Random, count: int = 60) -> None:
    await assert_tables_hold_the_rows_sums(database)
    for start, end in periods(rng, count):
        where = f"[{start!r}, {end!r})"
        by_key = await raw_sums(database, "key_name", start, end)
        total = sum(cost for _, cost in by_key.values())
        assert await spend_between(database, start, end) == total, where
        for group, column in (("key", "key_name"), ("team", "team"), ("model", "model")):
            raw = await raw_sums(database, column, start, end)
            found = await spend_by(database, group, start, end)
            expected = {("(none)" if k is None else k): v for k, v in raw.items()}
            assert {k: (s.requests, s.cost_nano) for k, s in found.items()} == expected, where
        only = await spend_by(database, "key", start, end, UsageFilter(team="search"))
        raw_team = await database.fetch(
            "SELECT key_name, COUNT(*), SUM(cost_nano) FROM requests WHERE ts >= ? AND ts < ? "
            "AND team = 'search' GROUP BY key_name",
            (start, end),
        )
        assert {k: (s.requests, s.cost_nano) for k, s in only.items()} == {
            k: (int(c), int(s)) for k, c, s in raw_team
        }, where
        budget = Budget(
            "b", BudgetConfig(scope="key", target="bob", limit_usd=1), 1, start, end, target="bob"
        )
        assert await ledger_spend(database, budget) == by_key.get("bob", (0, 0))[1], where
        each = EachBudget("each", BudgetConfig(scope="team", target="*", limit_usd=1), 1)
        raw_teams = await raw_sums(database, "team", start, end)
        spenders = {k: v[1] for k, v in raw_teams.items() if k is not None and v[1] > 0}
        assert await ledger_spend_each(database, each, start, end) == spenders, where
        top = await ledger_spend_each(database, each, start, end, top=1)
        assert list(top.values()) == sorted(spenders.values(), reverse=True)[:1], where
        middle = sorted(spenders.values())[len(spenders) // 2] if spenders else 1
        counted = await ledger_count_each(database, each, start, end, middle)
        assert counted == sum(v >= middle for v in spenders.values()), where


async def test_sums_by_hour_are_the_rows_sums_for_any_period(database: Database) -> None:
    writer = LedgerWriter(database, flush_seconds=0.01, batch_rows=97)
    await writer.start()
    for row in ledger_rows(3000):
        writer.append(row)
    await writer.close()
    ((stored,),) = await database.fetch("SELECT COUNT(*) FROM requests")
    ((by_key,),) = await database.fetch("SELECT COUNT(*) FROM key_spend_hours")
    ((by_model,),) = await database.fetch("SELECT COUNT(*) FROM usage_hours")
    assert stored == 3020
    assert by_key <= 31 * len(KEYS) * len(MODELS)  # sums, not rows
    assert by_model <= 31 * len(TEAMS) * len(MODELS) * len(UPSTREAMS) * 3  # three outcomes
    await assert_sums_match(database, random.Random(11))


async def test_the_migration_fills_the_sums_from_the_rows_before_it(database: Database) -> None:
    """A ledger from before the table: its rows are summed by the migration, and the
    writer's later batches add to those sums."""
    rows = ledger_rows(1500, seed=5)
    for table in ("usage_hours", "key_spend_hours", "latency_hours"):
        await database.execute(f"DROP TABLE {table}")
    await database.execute("DELETE FROM schema_migrations WHERE version = 12")
    insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    await database.executemany(insert, rows[:1000])
    assert await migrate(database) == [12]
    await assert_sums_match(database, random.Random(13), count=30)
    writer = LedgerWriter(database, flush_seconds=0.01)
    await writer.start()
    for row in rows[1000:]:  # some in the same hours as the migrated ones
        writer.append(row)
    await writer.close()
    await assert_sums_match(database, random.Random(17), count=30)


async def test_a_batch_retried_after_its_answer_was_lost_is_summed_once(
    database: Database,
) -> None:
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.01)
    await writer.start()
    rows = ledger_rows(400, seed=9)
    recording.lose_answer_next = 1  # committed, then the connection "dropped"
    for row in rows[:200]:
        writer.append(row)
    await wait_for(lambda: recording.failures >= 1)
    for row in rows[200:]:
        writer.append(row)
    await wait_for(lambda: writer.committed == len(rows))
    await writer.close()
    ((stored,),) = await database.fetch("SELECT COUNT(*) FROM requests")
    assert stored == 420
    for table in ("usage_hours", "key_spend_hours"):
        ((summed,),) = await database.fetch(f"SELECT SUM(requests) FROM {table}")
        assert int(summed) == 420
    await assert_sums_match(database, random.Random(19), count=20)


async def test_rows_and_their_sums_commit_together_or_not_at_all(database: Database) -> None:
    rows = ledger_rows(10)
    insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    with pytest.raises(Exception, match=r"no_such_table|no such table"):
        await database.write([(insert, rows), ("INSERT INTO no_such_table VALUES (?)", [(1,)])])
    assert await database.fetch("SELECT COUNT(*) FROM requests") == [(0,)]


async def test_gateways_writing_the_same_hours_at_once_do_not_deadlock(
    fresh_postgres_url: str,
) -> None:
    """Four gateways' writers on one PostgreSQL ledger commit batches of the same hour's
    1,000 keys at the same moment, each meeting the keys in its own order: no commit
    fails on a deadlock and the sums are the rows'. (Each batch adds its sums in key
    order; a writer that added them in the order met, in Python, had two deadlocks in a
    round of this test. PostgreSQL's grouping happens to emit key order here too, so
    this test guards the outcome rather than the ORDER BY alone.)"""
    databases = [await open_database(fresh_postgres_url) for _ in range(4)]
    writers = [LedgerWriter(db, flush_seconds=3600, batch_rows=10**6) for db in databases]
    (row,) = ledger_rows(0)[:1]
    keys = [f"user-{n}" for n in range(1000)]
    rng = random.Random(31)
    try:
        for round_ in range(3):
            for n, writer in enumerate(writers):
                for i, key in enumerate(rng.sample(keys, len(keys))):
                    writer.append(row._replace(key_name=key, request_id=f"{round_}-{n}-{i}"))
            failed = await asyncio.gather(*(w.flush() for w in writers), return_exceptions=True)
            assert [f for f in failed if f is not None] == []
        ((stored,),) = await databases[0].fetch("SELECT COUNT(*) FROM requests")
        assert stored == 3 * 4 * len(keys)
        await assert_sums_match(databases[0], random.Random(29), count=20)
    finally:
        for db in databases:
            await db.close()


@pytest.mark.parametrize("name", ["7d", "30d"])
async def test_long_windows_count_exactly_and_rank_within_a_bin(
    database: Database, name: str
) -> None:
    """The Overview's 7 and 30 days, from the sums by hour and the hour under way's rows:
    every count and sum the rows' own, every p95 within 4.5 % of their nearest rank."""
    writer = LedgerWriter(database, flush_seconds=0.01)
    await writer.start()
    rows = ledger_rows(4000, seed=37)
    for row in rows:
        writer.append(row)
    await writer.close()
    window = WINDOWS[name]
    now = EPOCH + 29.5 * HOUR  # half of hour 29 under way; the rows after now not yet
    groups, series = await long_window(database, window, now)
    first = series["timestamps"][0]
    assert first % window.step == 0 and now - first <= window.seconds
    seen = [row for row in rows if first <= row.ts < now]
    for group in groups:
        mine = [row for row in seen if group.name in (None, row.model)]
        assert group.requests == len(mine)
        assert group.errors == sum(row.outcome in ERROR_OUTCOMES for row in mine)
        assert group.refused == sum(row.outcome in REFUSED_OUTCOMES for row in mine)
        assert group.cost_nano == sum(row.cost_nano for row in mine)
        assert group.input_tokens == sum(row.input_tokens for row in mine)
        exact = sorted(row.duration_ms for row in mine)[math.ceil(0.95 * len(mine)) - 1]
        assert abs(math.log2(group.p95_ms / max(exact, 2**-10))) <= 1 / 16 + 1e-9
    for model, line in series["models"].items():
        for index, rate in enumerate(line["requests_per_second"]):
            start = first + index * window.step
            end = min(start + window.step, now)
            inside = [r for r in seen if r.model == model and start <= r.ts < end]
            assert round(rate * (end - start)) == len(inside), (model, index)
            ttfts = sorted(r.ttft_ms for r in inside if r.ttft_ms is not None)
            if ttfts:
                exact = ttfts[math.ceil(0.95 * len(ttfts)) - 1]
                assert abs(math.log2(line["ttft_p95_ms"][index] / exact)) <= 1 / 16 + 1e-9
            else:
                assert line["ttft_p95_ms"][index] is None
