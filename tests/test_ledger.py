"""The usage ledger on SQLite and on a real PostgreSQL: migrations, group commit, retries.

Every test that takes `database_url` runs against both backends, because the gateway
promises the same ledger on either: the same schema, the same rows bit for bit (integer
nano-USD costs, never floats), and no row lost or written twice when a commit fails.
"""

# ruff: noqa: F811 - test parameters named like the fixtures imported from tests.services

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import httpx
import openai
import pytest

from metergate.metering.ledger import COLUMNS, LedgerRow, LedgerWriter
from metergate.metering.metrics import APIS
from metergate.storage.database import Database, Row, open_database
from metergate.storage.migrations import MIGRATIONS, latest_version, migrate
from tests.harness import BackgroundLoop, Gateway, simulated_config
from tests.services import (  # noqa: F401 - fixtures, also when conftest.py lacks them
    PostgresServer,
    fresh_postgres_url,
    postgres_server,
)

SELECT_ROWS = f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id"


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    yield db
    await db.close()


class RecordingDatabase(Database):
    """Wraps a real database to count group commits and to make chosen commits fail.

    `fail_next` commits raise before reaching the database, like a dropped connection;
    failures of the real database underneath are counted in `failures` and re-raised.
    """

    def __init__(self, inner: Database) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.transactions = 0
        self.batch_sizes: list[int] = []
        self.fail_next = 0
        self.lose_answer_next = 0  # commit, then fail as if the answer never arrived
        self.failures = 0

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.inner.execute(sql, params)

    async def write(self, statements: Sequence[tuple[str, Iterable[Sequence[Any]]]]) -> None:
        statements = [(sql, list(rows)) for sql, rows in statements]
        if self.fail_next:
            self.fail_next -= 1
            self.failures += 1
            raise ConnectionResetError("simulated: connection to the database lost")
        try:
            await self.inner.write(statements)
        except Exception:
            self.failures += 1
            raise
        self.transactions += 1
        self.batch_sizes.append(len(statements[0][1]))  # the ledger rows, not their sums
        if self.lose_answer_next:
            self.lose_answer_next -= 1
            self.failures += 1
            raise ConnectionResetError("simulated: committed, then the connection was lost")

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self.inner.fetch(sql, params)

    async def script(self, statements: Sequence[str], lock_key: int) -> None:
        await self.inner.script(statements, lock_key)

    async def close(self) -> None:
        await self.inner.close()


def make_row(i: int) -> LedgerRow:
    """A row with values that expose lossy storage: costs beyond float precision, NULLs."""
    return LedgerRow(
        ts=1_750_000_000.123456 + i / 1024,
        request_id=f"req-{i:06d}",
        key_name=f"service-{i % 7}",
        model="gpt-4.1" if i % 2 else "claude-sonnet",
        upstream=f"up-{i % 3}",
        attempts=1 + i % 3,
        input_tokens=1000 + i,
        cached_input_tokens=i % 128,
        output_tokens=7 * i,
        cost_nano=2**53 + 1 + i,  # not representable as a float: must stay an integer
        saved_nano=i * 1_000_003,
        duration_ms=12.5 + i / 8,
        ttft_ms=None if i % 2 else 3.25 + i / 16,
        outcome="success" if i % 5 else "upstream_error",
        status=200 if i % 5 else 502,
        cache_hit=i % 2,
        stream=(i // 2) % 2,
        api=APIS[i % len(APIS)],
    )


async def stored_rows(database: Database) -> list[LedgerRow]:
    return [LedgerRow(*row) for row in await database.fetch(SELECT_ROWS)]


async def wait_for(condition: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def applied_versions(database: Database) -> list[int]:
    rows = await database.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [row[0] for row in rows]


# --- migrations ---------------------------------------------------------------------------


async def test_migrations_apply_once_and_reopening_is_a_no_op(database_url: str) -> None:
    first = await open_database(database_url)
    try:
        assert await applied_versions(first) == [m.version for m in MIGRATIONS]
        assert latest_version() == MIGRATIONS[-1].version
        assert await migrate(first) == []  # nothing left to apply
        columns = await first.fetch("SELECT max_tokens_cap FROM keys")  # migration 2 applied
        assert columns == []
    finally:
        await first.close()
    second = await open_database(database_url)
    try:
        assert await applied_versions(second) == [m.version for m in MIGRATIONS]
    finally:
        await second.close()


async def test_concurrent_opens_in_one_process(database_url: str) -> None:
    """Several tasks opening a fresh database together all succeed; each version once."""
    opened = await asyncio.gather(*(open_database(database_url) for _ in range(6)))
    try:
        assert await applied_versions(opened[0]) == [m.version for m in MIGRATIONS]
    finally:
        for db in opened:
            await db.close()


OPEN_AT = """
import asyncio, sys, time
from metergate.storage.database import open_database

async def main() -> None:
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all processes start together
    database = await open_database(sys.argv[1])
    await database.close()

asyncio.run(main())
"""


async def test_concurrent_opens_from_several_processes(database_url: str) -> None:
    """Gateway workers start at once and each migrates: none may fail or double-apply."""
    start_at = time.time() + 1.0
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            OPEN_AT,
            database_url,
            str(start_at),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = [await asyncio.wait_for(p.communicate(), 60) for p in processes]
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr.decode()
    database = await open_database(database_url)
    try:
        assert await applied_versions(database) == [m.version for m in MIGRATIONS]
    finally:
        await database.close()


# --- group commit -----------------------------------------------------------------------


async def test_group_commit_stores_rows_exactly(database: Database) -> None:
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.05, batch_rows=500)
    await writer.start()
    appended = [make_row(i) for i in range(3000)]
    started = time.monotonic()
    for burst in range(30):  # requests finish in bursts between event-loop turns
        for row in appended[burst * 100 : (burst + 1) * 100]:
            writer.append(row)
        await asyncio.sleep(0.005)
    await wait_for(lambda: writer.committed == len(appended))
    elapsed = time.monotonic() - started
    await writer.close()

    assert await stored_rows(database) == appended  # same values, same order, no floats
    nulls = await database.fetch("SELECT count(*) FROM requests WHERE ttft_ms IS NULL")
    assert nulls[0][0] == sum(row.ttft_ms is None for row in appended)  # SQL NULLs
    # one commit per window or per full batch, not one per row
    bound = len(appended) // writer.batch_rows + elapsed / writer.flush_seconds + 2
    assert recording.transactions <= bound, (recording.transactions, elapsed)
    assert recording.transactions < 60
    assert sum(recording.batch_sizes) == len(appended)


async def test_close_flushes_everything_pending(database: Database) -> None:
    writer = LedgerWriter(database, flush_seconds=30, batch_rows=10_000)  # never on its own
    await writer.start()
    appended = [make_row(i) for i in range(1234)]
    for row in appended:
        writer.append(row)
    await asyncio.sleep(0.05)
    assert writer.pending == len(appended)
    await writer.close()
    assert writer.pending == 0 and writer.committed == len(appended)
    assert await stored_rows(database) == appended


async def test_full_batch_commits_before_the_window_ends(database: Database) -> None:
    writer = LedgerWriter(database, flush_seconds=30, batch_rows=100)
    await writer.start()
    try:
        for i in range(100):
            writer.append(make_row(i))
        await wait_for(lambda: writer.committed == 100, within=5)
    finally:
        await writer.close()


async def test_failed_commit_keeps_rows_and_retries(database: Database) -> None:
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.02, batch_rows=1000)
    recording.fail_next = 2
    await writer.start()
    appended = [make_row(i) for i in range(500)]
    for row in appended[:300]:
        writer.append(row)
    await wait_for(lambda: recording.failures >= 1)
    for row in appended[300:]:  # newer rows queue behind the ones being retried
        writer.append(row)
    await wait_for(lambda: writer.committed == len(appended))
    await writer.close()
    assert recording.failures == 2
    assert await stored_rows(database) == appended  # none lost, none twice, in order


async def test_flush_that_fails_raises_and_keeps_the_rows(database: Database) -> None:
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=30)
    appended = [make_row(i) for i in range(10)]
    for row in appended:
        writer.append(row)
    recording.fail_next = 1
    with pytest.raises(ConnectionResetError):
        await writer.flush()
    assert writer.pending == len(appended) and writer.committed == 0
    await writer.close()  # not started: close still commits what is pending
    assert await stored_rows(database) == appended


async def test_database_closed_under_the_writer(database: Database) -> None:
    """The connection goes away mid-run: commits fail until it is back, then catch up."""
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.02)
    await writer.start()
    appended = [make_row(i) for i in range(600)]
    for row in appended[:200]:
        writer.append(row)
    await wait_for(lambda: writer.committed == 200)
    await database.close()
    for row in appended[200:400]:
        writer.append(row)
    await wait_for(lambda: recording.failures >= 1)
    assert writer.pending >= 200
    await database.connect()  # type: ignore[attr-defined] - both backends reconnect so
    for row in appended[400:]:
        writer.append(row)
    await wait_for(lambda: writer.committed == len(appended))
    await writer.close()
    assert await stored_rows(database) == appended


async def test_a_commit_whose_answer_was_lost_is_not_written_twice(database: Database) -> None:
    """COMMIT reached the database but its answer did not reach the gateway (the
    connection died, or failed while the pool took it back): the batch must be found
    committed, not inserted again."""
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.02)
    await writer.start()
    appended = [make_row(i) for i in range(300)]
    for row in appended[:100]:
        writer.append(row)
    recording.lose_answer_next = 1
    await wait_for(lambda: recording.failures >= 1)
    for row in appended[100:]:
        writer.append(row)
    await wait_for(lambda: writer.committed == len(appended))
    await writer.close()
    assert await stored_rows(database) == appended


async def test_postgres_backends_killed_under_the_writer(
    postgres_server: PostgresServer, fresh_postgres_url: str
) -> None:
    """A PostgreSQL restart or failover drops every connection: no row lost or doubled."""
    database = await open_database(fresh_postgres_url)
    recording = RecordingDatabase(database)
    writer = LedgerWriter(recording, flush_seconds=0.02)
    await writer.start()
    try:
        appended = [make_row(i) for i in range(900)]
        name = fresh_postgres_url.rsplit("/", 1)[1]
        for third in range(3):
            for row in appended[third * 300 : (third + 1) * 300]:
                writer.append(row)
                if writer.pending % 50 == 0:
                    await asyncio.sleep(0)
            await asyncio.to_thread(
                postgres_server.psql,
                "postgres",
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            )
        await wait_for(lambda: writer.committed == len(appended), within=30)
        await writer.close()
        assert await stored_rows(database) == appended
    finally:
        await writer.close()
        await database.close()


async def test_concurrent_flushes_do_not_collide(database: Database) -> None:
    """`flush()` called from outside (tests, shutdown) while the background task commits."""
    writer = LedgerWriter(database, flush_seconds=0.001, batch_rows=10)
    await writer.start()
    appended = [make_row(i) for i in range(2000)]
    try:

        async def produce(offset: int) -> None:
            for i in range(offset, len(appended), 4):
                writer.append(appended[i])
                if i % 40 == offset:
                    await asyncio.sleep(0)

        async def flush_often() -> None:
            for _ in range(50):
                await writer.flush()
                await asyncio.sleep(0)

        await asyncio.gather(*(produce(k) for k in range(4)), flush_often(), flush_often())
    finally:
        await writer.close()
    stored = await stored_rows(database)
    assert sorted(stored) == sorted(appended)  # concurrent producers: any order, each once


async def test_failed_group_commit_does_not_undo_other_writes(database: Database) -> None:
    """A commit that rolls back must take only its own rows with it, not a key created
    meanwhile on the same connection (SQLite has a single one)."""
    bad = make_row(1)._replace(outcome=None)  # NOT NULL: the whole batch fails

    async def create_key() -> None:
        await database.execute(
            "INSERT INTO keys (id, name, key_hash, hint, created_at) VALUES (?, ?, ?, ?, ?)",
            ("key_1", "svc", "hash", "abcd", time.time()),
        )

    writer = LedgerWriter(database)
    writer.append(make_row(0))
    writer.append(bad)
    results = await asyncio.gather(writer.flush(), create_key(), return_exceptions=True)
    assert isinstance(results[0], Exception) and results[1] is None, results
    assert await database.fetch("SELECT name FROM keys") == [("svc",)]
    assert await database.fetch("SELECT COUNT(*) FROM requests") == [(0,)]


# --- end to end ---------------------------------------------------------------------------


def test_gateway_writes_its_ledger_to_postgres(
    gateway_factory: Callable[..., Gateway], bg: BackgroundLoop, fresh_postgres_url: str
) -> None:
    """Requests served with the openai SDK land in PostgreSQL with exact integer costs."""
    config = simulated_config(latency_ms=0, output_tokens=24)  # price 1.0 / 0.5 / 2.0 per M
    config["ledger"] = {"url": fresh_postgres_url}
    gateway = gateway_factory(config)
    client = gateway.client()
    expected: dict[str, tuple[int, int, int, bool]] = {}
    for i in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="sim",
            messages=[{"role": "user", "content": f"question number {i} " * (i + 1)}],
            extra_headers={"x-request-id": f"e2e-{i}"},
        )
        reply = raw.parse()
        assert reply.usage is not None
        cached = reply.usage.prompt_tokens_details.cached_tokens or 0  # type: ignore[union-attr]
        expected[f"e2e-{i}"] = (
            reply.usage.prompt_tokens - cached,
            cached,
            reply.usage.completion_tokens,
            False,
        )
        cost_nano = (reply.usage.prompt_tokens - cached) * 1000 + cached * 500
        cost_nano += reply.usage.completion_tokens * 2000
        assert raw.headers["x-metergate-cost-usd"] == f"{cost_nano / 1e9:.9f}"
    long_prompt = "many words to fill the prompt cache " * 300  # >= 1024 tokens: cached part
    stream = client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": long_prompt}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "e2e-stream"},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    cached = usage.prompt_tokens_details.cached_tokens or 0  # type: ignore[union-attr]
    assert cached > 0
    expected["e2e-stream"] = (usage.prompt_tokens - cached, cached, usage.completion_tokens, True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "e2e-404"},
        )
    with pytest.raises(openai.AuthenticationError):  # unauthenticated: metrics only
        openai.OpenAI(base_url=gateway.base_url, api_key="mgk_" + "x" * 43).models.list()
    httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"authorization": "Bearer mgk_" + "y" * 43, "x-request-id": "e2e-401"},
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
    )
    gateway.flush_ledger()

    async def read() -> list[dict[str, Any]]:
        database = await open_database(fresh_postgres_url)  # a connection of our own
        try:
            assert database.dialect == "postgresql"
            rows = await database.fetch(SELECT_ROWS)
        finally:
            await database.close()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    rows = {row["request_id"]: row for row in bg.run(read())}
    assert set(rows) == {*expected, "e2e-404"}  # the 401 is not in the ledger
    for request_id, (input_tokens, cached, output, streamed) in expected.items():
        row = rows[request_id]
        assert (row["key_name"], row["model"], row["upstream"]) == ("test", "sim", "sim-up")
        assert (row["outcome"], row["status"], row["attempts"]) == ("success", 200, 1)
        assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (
            input_tokens,
            cached,
            output,
        )
        assert row["stream"] == int(streamed) and row["cache_hit"] == 0
        cost = input_tokens * 1000 + cached * 500 + output * 2000  # nano-USD per token
        assert row["cost_nano"] == cost and isinstance(row["cost_nano"], int)
        assert row["duration_ms"] >= 0 and abs(row["ts"] - time.time()) < 60
    missing = rows["e2e-404"]
    assert (missing["status"], missing["key_name"], missing["cost_nano"]) == (404, "test", 0)
    assert missing["outcome"] != "success"
