"""The console's reports run apart from the requests and the ledger writer.

A report over a month of a busy ledger takes seconds (tens at millions of rows). On the
connection the ledger writes on and requests read from (a Responses follow-up reads its
stored conversation), it held them up for as long; the console asks again every 15 s.
Reports get a connection of their own (SQLite) or a pool of their own (PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from metergate.storage.database import Database, open_database
from tests.harness import Gateway
from tests.test_console_api import ADMIN_KEY, console_config

# A statement that keeps SQLite busy for seconds, whatever the ledger holds.
LONG_SQLITE = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 30000000) "
    "SELECT count(*) FROM n"
)
LONG_POSTGRES = "SELECT pg_sleep(8)"


def long_statement(database: Database) -> str:
    return LONG_POSTGRES if database.dialect == "postgresql" else LONG_SQLITE


async def test_long_reports_hold_up_neither_reads_nor_ledger_writes(database_url):
    database = await open_database(database_url)
    reports = await database.reports()
    assert reports is not database
    assert await database.reports() is reports  # opened once
    # More long reports than the database has connections for requests (PostgreSQL: 4).
    running = [asyncio.create_task(reports.fetch(long_statement(database))) for _ in range(5)]
    try:
        await asyncio.sleep(0)  # the reports take their connections first
        await database.executemany(
            "INSERT INTO config_versions (hash, source, body, applied_at, note) "
            "VALUES (?, ?, ?, ?, ?)",
            [("h1", "test", "body", 1.0, "test")],
        )
        rows = await database.fetch("SELECT hash FROM config_versions WHERE hash = ?", ("h1",))
        assert rows == [("h1",)]
        assert not any(task.done() for task in running), "the reports ended first"
    finally:
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(BaseException):
                await task
        await database.close()


async def test_a_report_may_run_longer_than_the_ledger_timeout(fresh_postgres_url):
    """A statement of the ledger's connections gives up after `ledger.timeout_seconds`
    (a hung server must not hold a request); a report only holds up its own page, and a
    month of rows takes longer than that."""
    database = await open_database(fresh_postgres_url, answer_within=1)
    try:
        with pytest.raises(TimeoutError):
            await database.fetch("SELECT pg_sleep(2)")
        reports = await database.reports()
        assert await reports.fetch("SELECT 1 FROM pg_sleep(2)") == [(1,)]
    finally:
        await database.close()


def test_the_console_answers_while_the_ledger_connection_is_busy(gateway_factory):
    """A long statement on the ledger's own connection (a big write, say) does not hold
    up the console's pages either."""
    gateway: Gateway = gateway_factory(console_config())
    database = gateway.runtime.database
    busy = gateway.bg.submit(database.fetch(long_statement(database)))
    try:
        pages = [
            "/admin/api/overview?window=30d",
            "/admin/api/upstreams?window=24h",
            "/admin/api/usage?by=key&window=7d",
            "/admin/api/requests?limit=10",
            "/admin/api/keys",
            "/admin/api/teams",
        ]
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        base = gateway.base_url.removesuffix("/v1")
        for page in pages:
            response = httpx.get(base + page, headers=headers, timeout=60)
            assert response.status_code == 200, (page, response.text)
            assert not busy.done(), f"{page} answered only after the ledger's statement ended"
    finally:
        with contextlib.suppress(BaseException):
            busy.result(timeout=60)
