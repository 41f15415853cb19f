"""A ledger database outage: rows spooled to local disk and written back exactly once,
and a gateway that keeps answering meanwhile.

The writer's tests run on SQLite and on a real PostgreSQL, behind a switch that makes the
database refuse every call as an unreachable one would. The last tests take a real
PostgreSQL away from a running `metergate serve`: what callers and probes see while it is
gone, and a gateway stopped then, started again (with two workers, which race for the
spool) once it is back.
"""

# ruff: noqa: F811 - test parameters named like the fixtures imported from tests.services

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from metergate.metering.ledger import LedgerWriter
from metergate.metering.spool import Spool
from metergate.storage.database import Database, Row, open_database, sqlite_path, unreachable
from metergate.storage.response_saves import RetriedSaves, Save
from metergate.storage.responses import ResponseStore
from tests.harness import Gateway, simulated_config
from tests.services import (
    GatewayProcess,
    PostgresServer,
    _make_postgres,
    create_key_sync,
    fill,
    free_port,
    small_filesystem,
)
from tests.test_ledger import (  # noqa: F401 - `database` is a fixture
    RecordingDatabase,
    database,
    make_row,
    stored_rows,
    wait_for,
)
from tests.test_workers import costs, wait_until

ADMIN_KEY = "outage-admin-key-0123456789abcdef"


class Unreachable(RecordingDatabase):
    """A real database that refuses every call while `down` is set, like a stopped server."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("simulated: the ledger database is unreachable")

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._check()
        await super().execute(sql, params)

    async def write(self, statements: Sequence[tuple[str, Iterable[Sequence[Any]]]]) -> None:
        self._check()
        await super().write(statements)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._check()
        return await super().fetch(sql, params)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("ledger-*.jsonl")) if directory.exists() else []


async def test_rows_refused_at_shutdown_are_spooled_and_written_at_the_next_start(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    unreachable = Unreachable(database)
    writer = LedgerWriter(unreachable, flush_seconds=0.02, spool=Spool(spool), spool_after=0.2)
    await writer.start()
    appended = [make_row(i) for i in range(300)]
    for row in appended[:100]:
        writer.append(row)
    await wait_for(lambda: writer.committed == 100)
    unreachable.down = True
    for row in appended[100:]:
        writer.append(row)
    with caplog.at_level(logging.ERROR, "metergate.ledger"):
        await writer.close()  # retries for spool_after, then spools: does not raise
    assert writer.held == 0 and writer.pending == 200  # every refused row is on disk
    assert spool_files(spool) != [] and "rows spooled to" in caplog.text
    assert await stored_rows(database) == appended[:100]

    restarted = LedgerWriter(database, spool=Spool(spool))
    restarted.adopt_spool()
    assert restarted.pending == 200  # counted before they are written
    await restarted.flush()
    assert await stored_rows(database) == appended  # none lost, none twice, in order
    assert spool_files(spool) == [] and restarted.pending == 0
    await restarted.close()
    for table in ("usage_hours", "key_spend_hours"):  # the replayed rows summed once too
        ((count, cost),) = await database.fetch(
            f"SELECT SUM(requests), SUM(cost_nano) FROM {table}"
        )
        assert (int(count), int(cost)) == (300, sum(row.cost_nano for row in appended)), table


async def test_a_long_outage_moves_rows_to_disk_and_back_once_the_database_returns(
    database: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    unreachable = Unreachable(database)
    pending: list[int] = []
    writer = LedgerWriter(
        unreachable,
        flush_seconds=0.02,
        spool=Spool(spool),
        spool_after=0.1,
        on_pending=pending.append,
    )
    await writer.start()
    unreachable.down = True
    appended = [make_row(i) for i in range(500)]
    for row in appended[:250]:
        writer.append(row)
    await wait_for(lambda: spool_files(spool) != [])
    assert writer.held < 250  # out of memory, on disk ...
    await wait_for(lambda: bool(pending) and pending[-1] >= 250)  # ... and still counted
    for row in appended[250:]:
        writer.append(row)
    unreachable.down = False
    await wait_for(lambda: writer.committed == len(appended))
    await writer.close()
    assert await stored_rows(database) == appended
    assert spool_files(spool) == [] and writer.pending == 0


async def test_a_replay_cut_off_midway_writes_no_row_twice(
    database: Database, tmp_path: Path
) -> None:
    """The first batch of a spool file is committed but its answer is lost: the file
    stays, and the next replay finds that batch in the ledger and writes only the rest."""
    spool = Spool(tmp_path / "spool")
    appended = [make_row(i) for i in range(90)]
    spool.write([appended[:30], appended[30:60], appended[60:]])
    recording = RecordingDatabase(database)
    recording.lose_answer_next = 1
    writer = LedgerWriter(recording, spool=spool)
    writer.adopt_spool()
    with pytest.raises(ConnectionResetError):
        await writer.flush()
    assert await stored_rows(database) == appended[:30]
    assert writer.pending == 90 and len(spool_files(spool.directory)) == 1
    await writer.flush()
    assert await stored_rows(database) == appended
    assert spool_files(spool.directory) == [] and writer.pending == 0


async def test_writers_racing_for_one_spool_write_each_row_once(
    database_url: str, tmp_path: Path
) -> None:
    """Each worker of a gateway adopts every spool file at start: one takes each file."""
    spool = Spool(tmp_path / "spool")
    appended = [make_row(i) for i in range(400)]
    for part in range(4):
        spool.write([appended[part * 100 : part * 100 + 50], appended[part * 100 + 50 :][:50]])
    databases = [await open_database(database_url) for _ in range(3)]
    try:
        writers = [LedgerWriter(db, spool=Spool(spool.directory)) for db in databases]
        for writer in writers:
            writer.adopt_spool()
        await asyncio.gather(*(writer.flush() for writer in writers))
        assert sorted(await stored_rows(databases[0])) == sorted(appended)
        assert sum(writer.committed for writer in writers) == len(appended)
        assert spool_files(spool.directory) == []
    finally:
        for db in databases:
            await db.close()


async def test_a_spool_file_written_held_waits_for_its_commit_before_a_replay(
    database: Database, tmp_path: Path
) -> None:
    """A file with the batch of a commit under way: no other replay takes it before the
    writer lets go, and the one that takes it then finds the batch committed."""
    spool = Spool(tmp_path / "spool")
    appended = [make_row(i) for i in range(20)]
    path, lock = spool.write_held([appended[:10], appended[10:]])
    probe = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # as a replay in another process finds it
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    other = LedgerWriter(database, spool=Spool(spool.directory))  # another worker, starting
    other.adopt_spool()
    assert other.pending == 20
    replaying = asyncio.create_task(other.flush())
    committing = LedgerWriter(database)  # the commit under way ends, and succeeds
    for row in appended[:10]:
        committing.append(row)
    await committing.flush()
    assert not replaying.done()
    Spool.release(lock)
    await replaying
    assert await stored_rows(database) == appended  # the first batch once
    assert other.committed == 10 and spool_files(spool.directory) == []


async def test_an_unreadable_spool_file_is_left_in_place_and_the_rest_written(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    appended = [make_row(i) for i in range(20)]
    spool.write([appended[:10]])
    broken = spool.directory / "ledger-2-1-1.jsonl"
    broken.write_bytes(b'[["not", "a ledger row"]]\n[[1,')
    spool.write([appended[10:]])
    writer = LedgerWriter(database, spool=spool)
    with caplog.at_level(logging.ERROR, "metergate.ledger"):
        writer.adopt_spool()
    assert f"ledger spool file {broken} left out" in caplog.text
    await writer.flush()
    assert await stored_rows(database) == appended
    assert spool_files(spool.directory) == [broken]


def test_a_spool_directory_that_cannot_be_written_is_reported_at_start(
    gateway_factory: Callable[..., Gateway], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found at start, not in the outage that needs it; the gateway serves all the same."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = simulated_config(latency_ms=0)
    config["ledger"] = {
        "url": f"sqlite:///{tmp_path / 'ledger.db'}",
        "spool_directory": str(blocker / "spool"),
    }
    with caplog.at_level(logging.WARNING, "metergate"):
        gateway = gateway_factory(config)
    assert f"ledger spool unusable ({blocker} is not a directory)" in caplog.text
    answer = gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content


async def test_a_database_that_cannot_be_reached_is_told_from_a_faulty_statement(
    database: Database, tmp_path: Path
) -> None:
    """`unreachable` decides between a 503 to retry and a 500 that is a bug."""
    with pytest.raises(Exception) as faulty:
        await database.fetch("SELECT * FROM no_such_table")
    assert not unreachable(faulty.value)
    with pytest.raises(sqlite3.Error) as cannot_open:
        sqlite3.connect(tmp_path / "no-such-directory" / "ledger.db")
    assert unreachable(cannot_open.value)
    with pytest.raises(OSError) as refused:  # nothing listens there
        await open_database(f"postgresql://postgres@127.0.0.1:{free_port()}/ledger")
    assert unreachable(refused.value)


async def test_responses_refused_in_an_outage_are_stored_once_it_ends_within_a_bound(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable_db = Unreachable(database)
    store = ResponseStore(unreachable_db)
    saves = RetriedSaves(store, max_bytes=700)
    unreachable_db.down = True
    kept = []
    with caplog.at_level(logging.WARNING, "metergate.responses"):
        for i in range(4):  # each about 300 bytes: the bound holds the last two
            response = {"id": f"resp_{i}", "object": "response", "output": ["x" * 250]}
            await saves.save(Save("key-1", response, [{"role": "user"}], None, time.time(), 60))
            kept.append(response)
    assert len(saves) == 2
    assert "response resp_0 not stored: more than 700 bytes" in caplog.text
    unreachable_db.down = False
    await wait_for(lambda: len(saves) == 0)
    for response in kept[2:]:
        assert await store.get(response["id"], "key-1", time.time()) == response
    for response in kept[:2]:
        assert await store.get(response["id"], "key-1", time.time()) is None
    await saves.close()


# --- a commit that hangs on a lock held elsewhere ----------------------------------------

_HOLD_SQLITE = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


@contextlib.asynccontextmanager
async def write_lock_held_elsewhere(database_url: str) -> AsyncIterator[None]:
    """The ledger's write lock, held until the block ends: on SQLite by another process in
    `BEGIN EXCLUSIVE`, on PostgreSQL by another session's `LOCK TABLE requests` (reads go
    on, inserts wait). A commit begun meanwhile waits for it: it hangs, it does not fail."""
    path = sqlite_path(database_url)
    if path is not None:
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_SQLITE, path, stdin=PIPE, stdout=PIPE
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"locked\n"
            yield
        finally:
            holder.stdin.write(b"\n")
            holder.stdin.close()
            await holder.wait()
        return
    import asyncpg

    session = await asyncpg.connect(database_url)
    try:
        await session.execute("BEGIN; LOCK TABLE requests IN EXCLUSIVE MODE")
        yield
    finally:
        await session.execute("ROLLBACK")
        await session.close()


async def assert_written_once(database: Database, appended: list[Any]) -> None:
    """Every row in the ledger once, in order, and summed by hour once."""
    assert await stored_rows(database) == appended
    for table in ("usage_hours", "key_spend_hours"):
        ((count, cost),) = await database.fetch(
            f"SELECT SUM(requests), SUM(cost_nano) FROM {table}"
        )
        assert (int(count), int(cost)) == (
            len(appended),
            sum(row.cost_nano for row in appended),
        ), table


async def test_rows_of_a_commit_hung_on_a_lock_are_counted_and_spooled_on_time(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gauge follows the rows not committed, and they reach the spool after
    `spool_after`, while a commit waits on the lock (SQLite's busy timeout is 30 s; this
    PostgreSQL answers within 120 s). When the lock goes, the hung commit succeeds after
    its rows were spooled: the replay of the spool finds that batch in, and does not write
    it twice."""
    database = await open_database(database_url, 120)
    spool = tmp_path / "spool"
    gauge: list[int] = []
    writer = LedgerWriter(
        database,
        flush_seconds=0.05,
        spool=Spool(spool),
        spool_after=0.5,
        on_pending=gauge.append,
    )
    await writer.start()
    appended = [make_row(i) for i in range(400)]
    try:
        for row in appended[:100]:
            writer.append(row)
        await wait_for(lambda: writer.committed == 100)
        with caplog.at_level(logging.WARNING, "metergate.ledger"):
            async with write_lock_held_elsewhere(database_url):
                for row in appended[100:200]:
                    writer.append(row)
                await wait_for(lambda: gauge[-1] == 100)  # then a commit takes them, and waits
                for row in appended[200:300]:
                    writer.append(row)
                await wait_for(lambda: gauge[-1] == 200, within=20)
                await wait_for(lambda: spool_files(spool) != [] and writer.held == 0, within=20)
                assert writer.pending == 200  # the commit's batch spooled too, counted once
                await wait_for(lambda: gauge[-1] == 200)
                failing = writer.failing_for
                assert failing is not None and failing >= 0.5  # /readyz: unwritable
            for row in appended[300:]:
                writer.append(row)
            await wait_for(lambda: writer.committed == 400 and writer.pending == 0, within=60)
            await wait_for(lambda: gauge[-1] == 0)
        assert "ledger commit failed" not in caplog.text  # the hung commit succeeded
        await writer.close()
        await assert_written_once(database, appended)
        assert spool_files(spool) == [] and writer.committed == 400
    finally:
        await writer.close()
        await database.close()


async def test_a_spool_on_a_full_disk_is_said_once_and_shown_until_it_takes_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits hang (the write lock held elsewhere) and the spool's disk is full: the
    rows stay in memory, which `spool_failing` (/readyz) says, with one traceback, not
    one a tick; once the disk has room they are spooled, then written once."""
    database_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    database = await open_database(database_url)
    with small_filesystem(tmp_path / "small") as small:
        spool = small / "spool"
        spool.mkdir()
        writer = LedgerWriter(database, flush_seconds=0.05, spool=Spool(spool), spool_after=0.2)
        await writer.start()
        appended = [make_row(i) for i in range(100)]
        try:
            with caplog.at_level(logging.INFO, "metergate.ledger"):
                async with write_lock_held_elsewhere(database_url):
                    filler = fill(small)
                    for row in appended:
                        writer.append(row)
                    await wait_for(lambda: writer.spool_failing is not None, within=30)
                    assert "No space left on device" in writer.spool_failing
                    tried = writer._spool_failures  # every 0.2 s
                    await wait_for(lambda: tried.failures >= 3, within=30)
                    assert caplog.text.count("writing ledger rows to the spool failed") == 1
                    filler.unlink()
                    await wait_for(lambda: writer.spool_failing is None, within=30)
                    assert spool_files(spool), "spooled once there was room"
                said = [r for r in caplog.records if "ledger rows to the spool" in r.message]
                assert said[0].exc_info is not None
                assert said[-1].message.startswith("writing ledger rows to the spool works again")
            await wait_for(lambda: writer.committed == 100 and writer.pending == 0, within=60)
            await writer.close()
            await assert_written_once(database, appended)
        finally:
            await writer.close()
            await database.close()


async def test_a_commit_that_gives_up_after_its_rows_were_spooled_leaves_them_to_the_spool(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Spooled while the commit still waited on the lock; the commit then times out: its
    rows are written from the spool once the lock goes, once, and not kept in memory too."""
    database = await open_database(database_url, 4)  # PostgreSQL: statements give up at 4 s
    if database.dialect == "sqlite":
        await database.execute("PRAGMA busy_timeout=4000")
    spool = tmp_path / "spool"
    writer = LedgerWriter(database, flush_seconds=0.05, spool=Spool(spool), spool_after=0.2)
    await writer.start()
    appended = [make_row(i) for i in range(250)]
    try:
        for row in appended[:50]:
            writer.append(row)
        await wait_for(lambda: writer.committed == 50)
        with caplog.at_level(logging.WARNING, "metergate.ledger"):
            async with write_lock_held_elsewhere(database_url):
                for row in appended[50:150]:
                    writer.append(row)
                await wait_for(lambda: "ledger commit failed" in caplog.text, within=60)
                log = caplog.text
                assert "rows spooled to" in log, log
                assert log.index("rows spooled to") < log.index("ledger commit failed"), log
                assert writer.held == 0 and writer.pending == 100  # on disk only
                for row in appended[150:200]:
                    writer.append(row)
            for row in appended[200:]:
                writer.append(row)
            await wait_for(lambda: writer.committed == 250 and writer.pending == 0, within=60)
        await writer.close()
        await assert_written_once(database, appended)
        assert spool_files(spool) == []
    finally:
        await writer.close()
        await database.close()


# --- a real gateway on a real PostgreSQL --------------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of these tests' own: they stop and start it mid-test."""
    server = _make_postgres()  # skips, as every PostgreSQL test does, without the binaries
    server.start()
    try:
        yield server
    finally:
        server.stop()


def gateway_config(tmp_path: Path, ledger_url: str, **ledger: Any) -> Path:
    config = {
        "ledger": {"url": ledger_url, "spool_after_seconds": 1, **ledger},
        "providers": {
            "sim": {"type": "simulated", "simulated": {"latency_ms": 5, "output_tokens": 8}}
        },
        "upstreams": {
            "sim-up": {"provider": "sim", "model": "sim-model", "price": {"input": 1, "output": 2}}
        },
        "models": {"sim": {"upstreams": ["sim-up"]}},
        "budgets": {"everything": {"limit_usd": 100, "hard": False}},
        "admin": {"api_key": ADMIN_KEY},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def served_on(
    server: PostgresServer, database: str, tmp_path: Path, workers: int = 1, **ledger: Any
) -> tuple[str, str, Path, GatewayProcess]:
    """A new database on `server`, a key in it, and a gateway process starting on it:
    (the database's name, the key, the config file, the gateway)."""
    url = server.create_database(database)
    key = create_key_sync(url, f"{database}-test")
    config = gateway_config(tmp_path, url, **ledger)
    gateway = GatewayProcess(config, tmp_path, workers=workers)
    return url.rsplit("/", 1)[1], key, config, gateway


def ask(gateway: GatewayProcess, key: str, request_id: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.with_raw_response.create(
        model="sim",
        messages=[{"role": "user", "content": "hello"}],
        extra_headers={"x-request-id": request_id},
    )
    assert answer.http_response.status_code == 200


def test_a_sqlite_ledger_locked_by_another_process_shows_in_metrics_and_spools_on_time(
    tmp_path: Path,
) -> None:
    """Another process holds the SQLite ledger's write lock (a backup, a tool with the file
    open): the gateway's commits wait on it for SQLite's busy timeout (30 s). Meanwhile
    /metrics counts the rows waiting as /readyz does, they reach the spool after
    `spool_after_seconds` (1 here), and once the lock goes each is in the ledger once."""
    ledger = tmp_path / "ledger.db"
    url = f"sqlite:///{ledger}"
    key = create_key_sync(url, "locked-test")
    gateway = GatewayProcess(gateway_config(tmp_path, url), tmp_path)
    spool = tmp_path / ".metergate" / "ledger-spool"

    def waiting() -> tuple[float, int]:
        metrics = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
        found = re.search(r"^metergate_ledger_pending_rows (\S+)$", metrics, re.M)
        assert found is not None, metrics
        ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10).json()
        return float(found.group(1)), ready["ledger_pending_rows"]

    try:
        gateway.wait_ready()
        for i in range(5):
            ask(gateway, key, f"before-{i}")
        wait_until(lambda: waiting() == (0, 0), "the first rows committed")
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_SQLITE, str(ledger)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == b"locked\n"
            for i in range(10):
                ask(gateway, key, f"during-{i}")
            # within 20 s: a commit waiting on the lock gives up after 30
            wait_until(lambda: waiting() == (10, 10), "/metrics to count the rows waiting", 20)
            wait_until(lambda: spool_files(spool) != [], "the rows spooled, lock held", 20)
            assert waiting() == (10, 10)  # spooled, and counted still
        finally:
            holder.stdin.write(b"\n")
            holder.stdin.close()
            holder.wait(60)
        for i in range(5):
            ask(gateway, key, f"after-{i}")
        wait_until(lambda: waiting() == (0, 0), "every row committed")
    finally:
        gateway.kill_all()
    with contextlib.closing(sqlite3.connect(ledger)) as connection:
        rows = [row[0] for row in connection.execute("SELECT request_id FROM requests")]
    expected = [f"before-{i}" for i in range(5)] + [f"during-{i}" for i in range(10)]
    assert sorted(rows) == sorted([*expected, *(f"after-{i}" for i in range(5))])  # once
    assert spool_files(spool) == []


def test_a_sighup_while_postgres_is_down_applies_once_it_is_back(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """A reload needs the ledger (it records the version). The admin API answers 503 and
    its caller tries again; a signal has no caller, so the gateway tries again itself
    (README: "the same reload applies once the database is back")."""
    url = own_postgres.create_database("hup")
    key = create_key_sync(url, "hup-test")
    config = gateway_config(tmp_path, url)
    gateway = GatewayProcess(config, tmp_path)

    def cost() -> str:
        (seen,) = costs(gateway, key, calls=1)
        return seen

    try:
        gateway.wait_ready()
        before = cost()
        raw = yaml.safe_load(config.read_text())
        raw["upstreams"]["sim-up"]["price"] = {"input": 100, "output": 200}
        own_postgres.pause()
        try:
            config.write_text(yaml.safe_dump(raw))
            os.kill(gateway.pid, signal.SIGHUP)
            wait_until(
                lambda: "config reload (SIGHUP) waits for the ledger database" in gateway.log(),
                "the reload said it waits",
            )
            assert cost() == before  # the old config serves meanwhile
        finally:
            own_postgres.resume()
        wait_until(lambda: " applied (was " in gateway.log(), "the reload applied", limit=60)
        assert Decimal(cost()) == 100 * Decimal(before)
    finally:
        gateway.kill_all()


def test_a_reload_while_postgres_is_down_changes_nothing(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """A reload records its version in the ledger database: while that is down the
    admin API answers 503 and the config served stays, also when nothing the new config
    changes reads the database (a price alone), where it used to run, unrecorded, until
    the database was back and the fleet's recorded version replaced it."""
    url = own_postgres.create_database("reload_down")
    key = create_key_sync(url, "reload-down-test")
    config = gateway_config(tmp_path, url)
    raw = yaml.safe_load(config.read_text())
    del raw["budgets"]
    config.write_text(yaml.safe_dump(raw))
    gateway = GatewayProcess(config, tmp_path)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    def cost() -> Decimal:
        (seen,) = costs(gateway, key, calls=1)
        return Decimal(seen)

    try:
        gateway.wait_ready()
        raw["upstreams"]["sim-up"]["price"] = {"input": 100, "output": 200}
        own_postgres.pause()
        try:
            config.write_text(yaml.safe_dump(raw))
            refused = httpx.post(f"{gateway.base_url}/admin/reload", headers=admin, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "ledger_unavailable"
            during = cost()
        finally:
            own_postgres.resume()
        assert cost() == during  # the config it started with, still
        applied = httpx.post(f"{gateway.base_url}/admin/reload", headers=admin, timeout=30)
        assert applied.status_code == 200 and applied.json()["applied"] is True
        assert cost() == 100 * during
    finally:
        gateway.kill_all()


def test_a_ledger_file_deleted_under_the_gateway_is_reported(gateway_factory) -> None:
    """Deleted (or replaced) while the gateway has it open, a SQLite ledger goes on
    taking rows into a file no restart will find: /readyz says so, where it said
    "reachable" (and ?ledger=required takes the replica out)."""
    gateway: Gateway = gateway_factory(simulated_config())
    root = gateway.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/readyz", timeout=10).json()["ledger"] == "reachable"
    path = Path(sqlite_path(gateway.runtime.plan.config.ledger.url) or "")
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)
    ready = httpx.get(f"{root}/readyz", timeout=10).json()
    assert ready["ledger"].startswith(
        f"unwritable: its file {path} was deleted or moved since it was opened"
    ), ready
    strict = httpx.get(f"{root}/readyz?ledger=required", timeout=10)
    assert strict.status_code == 503


def test_while_postgres_is_down_the_gateway_answers_and_says_what_it_cannot_do(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.create_database("outage")
    key = create_key_sync(url, "outage-test")
    gateway = GatewayProcess(gateway_config(tmp_path, url), tmp_path)
    try:
        gateway.wait_ready()
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0)
        first = client.responses.create(model="sim", input="remember this")
        own_postgres.pause()
        try:
            ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text  # a shared outage empties no pool
            assert ready.json()["ledger"].startswith("unreachable: ")
            strict = httpx.get(f"{gateway.base_url}/readyz?ledger=required", timeout=10)
            assert strict.status_code == 503
            assert strict.json()["problems"] == [f"ledger database {ready.json()['ledger']}"]

            answer = client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "still there?"}]
            )
            assert answer.choices[0].message.content
            during = client.responses.create(model="sim", input="said in the outage")
            with pytest.raises(openai.APIStatusError) as chained:
                client.responses.create(model="sim", input="and?", previous_response_id=first.id)
            with pytest.raises(openai.APIStatusError) as read:
                client.responses.retrieve(first.id)
            for refused in (chained.value, read.value):
                assert refused.status_code == 503
                assert refused.response.headers["retry-after"] == "1"
                error = refused.response.json()["error"]
                assert error["code"] == "response_store_unavailable"
                assert error["message"] == (
                    f"stored response {first.id!r} cannot be read now: the response store "
                    "(the ledger database) is unreachable; try again shortly"
                )
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            keys = httpx.get(f"{gateway.base_url}/admin/api/keys", headers=admin, timeout=10)
            assert keys.status_code == 503, keys.text  # not "internal error, quote the id"
            assert keys.json()["error"]["code"] == "ledger_unavailable"
        finally:
            own_postgres.resume()
        assert client.responses.retrieve(first.id).id == first.id
        deadline = time.monotonic() + 30  # stored once the database answers again
        while True:
            try:
                assert client.responses.retrieve(during.id).id == during.id
                break
            except openai.NotFoundError:
                assert time.monotonic() < deadline, "the outage's response was never stored"
                time.sleep(0.1)
        follow_up = client.responses.create(
            model="sim", input="and after it?", previous_response_id=during.id
        )
        assert follow_up.previous_response_id == during.id
        keys = httpx.get(f"{gateway.base_url}/admin/api/keys", headers=admin, timeout=10)
        assert keys.status_code == 200
    finally:
        gateway.kill_all()


def test_a_gateway_stopped_while_postgres_is_down_loses_no_row(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    name, key, config, gateway = served_on(own_postgres, "spool", tmp_path)
    try:
        gateway.wait_ready()
        for i in range(10):
            ask(gateway, key, f"before-{i}")
        own_postgres.pause()
        for i in range(15):  # answered, metered, and queued for a ledger that is gone
            ask(gateway, key, f"during-{i}")
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.wait(60) == -signal.SIGTERM, gateway.log()
    finally:
        gateway.kill_all()
    assert "rows spooled to" in gateway.log()
    assert spool_files(tmp_path / ".metergate" / "ledger-spool") != []

    own_postgres.resume()
    restarted = GatewayProcess(config, tmp_path, workers=2)
    try:
        restarted.wait_ready()
        expected = sorted([f"before-{i}" for i in range(10)] + [f"during-{i}" for i in range(15)])
        deadline = time.monotonic() + 60  # the other worker may still be replaying a file
        while True:
            rows = own_postgres.psql(name, "SELECT request_id FROM requests")
            if len(rows.split()) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        metrics = httpx.get(f"{restarted.base_url}/metrics", timeout=10).text
    finally:
        restarted.kill_all()
    assert sorted(rows.split()) == expected  # every answered request, once
    spent = re.search(r'^metergate_budget_spent_usd\{budget="everything"\} (\S+)$', metrics, re.M)
    assert spent is not None, metrics
    cost_nano = int(own_postgres.psql(name, "SELECT sum(cost_nano) FROM requests"))
    # Each worker loaded the budget after the spool was in: the outage's spend counts.
    assert float(spent.group(1)) == pytest.approx(cost_nano / 1e9, rel=1e-9)
    assert spool_files(tmp_path / ".metergate" / "ledger-spool") == []


def test_a_worker_replaced_while_postgres_is_down_waits_for_it_as_the_other_serves(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """A worker cannot start without its ledger database. One that dies in an outage is
    replaced once the database is back; the gateway serves on the other meanwhile (uvicorn
    alone would stop the whole gateway when the replacement fails to start)."""
    name, key, _, gateway = served_on(own_postgres, "respawn", tmp_path, workers=2)
    try:
        gateway.wait_ready()
        wait_until(lambda: gateway.log().count("joined the gateway") == 2, "both workers")
        own_postgres.pause()
        os.kill(min(gateway.worker_pids()), signal.SIGKILL)
        wait_until(lambda: "could not start" in gateway.log(), "a replacement that failed")
        for i in range(10):
            ask(gateway, key, f"during-{i}")
        assert gateway.process.poll() is None

        own_postgres.resume()
        wait_until(
            lambda: gateway.log().count("joined the gateway") == 3, "the replacement to join"
        )
        assert len(gateway.worker_pids()) == 2
        for i in range(10):
            ask(gateway, key, f"after-{i}")
        gateway.process.send_signal(signal.SIGTERM)  # the workers write what they hold
        gateway.wait(60)
    finally:
        gateway.kill_all()
    served = {f"{when}-{i}" for when in ("during", "after") for i in range(10)}
    assert served <= set(own_postgres.psql(name, "SELECT request_id FROM requests").split())


def test_a_worker_that_cannot_start_with_the_gateway_stops_it_with_status_3(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """A role with one grant missing (the sums by hour a budget's spend is read from):
    `serve` opens the ledger, counts its keys and records its config, but its workers
    cannot start. The gateway never ran: it stops, and says so in its exit status for a
    process manager."""
    name = own_postgres.create_database("grants").rsplit("/", 1)[1]
    own_postgres.psql(name, "CREATE ROLE ungranted LOGIN")
    own_postgres.psql(name, f"ALTER DATABASE {name} OWNER TO ungranted")
    url = own_postgres.url(name).replace("postgres@", "ungranted@")
    create_key_sync(url, "grants-test")  # migrates as the role
    own_postgres.psql(name, "REVOKE ALL ON usage_hours FROM ungranted")
    gateway = GatewayProcess(gateway_config(tmp_path, url), tmp_path, workers=2)
    try:
        assert gateway.wait(90) == 3, gateway.log()
    finally:
        gateway.kill_all()
    assert "could not start; stopping the gateway" in gateway.log()
    assert "permission denied for table usage_hours" in gateway.log()


def test_a_postgres_that_stops_answering_is_unreachable_not_slow(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """A hung server keeps its connections open and answers nothing: calls give up after
    `ledger.timeout_seconds`, so rows spool, an unknown key gets its 503, a console page
    its 503 (a report may run for a minute, but not on a server that has stopped
    answering) and a stop ends."""
    name, key, config, gateway = served_on(own_postgres, "frozen", tmp_path, timeout_seconds=1)
    overview = f"{gateway.base_url.removesuffix('/v1')}/admin/api/overview"
    signed_in = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        gateway.wait_ready()
        for i in range(5):
            ask(gateway, key, f"before-{i}")
        # the reports' own pool is open, its connection idle, when the server freezes
        assert httpx.get(overview, headers=signed_in, timeout=30).status_code == 200
        own_postgres.freeze()
        try:
            for i in range(10):
                ask(gateway, key, f"during-{i}")
            unknown = httpx.post(
                f"{gateway.base_url}/v1/chat/completions",
                headers={"authorization": "Bearer mgk_" + "x" * 43},
                json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                timeout=60,
            )
            assert unknown.status_code == 503
            assert unknown.json()["error"]["code"] == "key_store_unavailable"
            page = httpx.get(overview, headers=signed_in, timeout=30)  # was 2 x 60 s
            assert page.status_code == 503
            assert page.json()["error"]["code"] == "ledger_unavailable"
            ready = httpx.get(f"{gateway.base_url}/readyz", timeout=30)
            assert ready.status_code == 200 and ready.json()["ledger"].startswith("unreachable")
            gateway.process.send_signal(signal.SIGTERM)
            assert gateway.wait(60) == -signal.SIGTERM, gateway.log()
        finally:
            own_postgres.thaw()
    finally:
        gateway.kill_all()
    assert "rows spooled to" in gateway.log()

    restarted = GatewayProcess(config, tmp_path)
    try:
        restarted.wait_ready()
        rows = own_postgres.psql(name, "SELECT request_id FROM requests").split()
    finally:
        restarted.kill_all()
    expected = [f"before-{i}" for i in range(5)] + [f"during-{i}" for i in range(10)]
    assert sorted(rows) == sorted(expected)  # every answered request, once


def test_a_ledger_that_reads_but_refuses_writes_is_reported_and_its_rows_kept(
    postgres_server: PostgresServer, fresh_postgres_url: str, tmp_path: Path
) -> None:
    """A full disk or a read-only replica answers SELECT 1 but fails every commit: /readyz
    says so, the rows spool, and they are written once commits work again."""
    name = fresh_postgres_url.rsplit("/", 1)[1]
    key = create_key_sync(fresh_postgres_url, "refused-test")
    gateway = GatewayProcess(gateway_config(tmp_path, fresh_postgres_url), tmp_path)
    try:
        gateway.wait_ready()
        postgres_server.psql(
            name,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$;"
            " CREATE TRIGGER refuse BEFORE INSERT ON requests"
            " FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
        for i in range(8):
            ask(gateway, key, f"refused-{i}")
        deadline = time.monotonic() + 30
        while "rows spooled to" not in gateway.log():
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.1)
        ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10).json()
        assert ready["ledger"].startswith("unwritable: commits failing for "), ready
        assert ready["ledger_pending_rows"] == 8
        postgres_server.psql(name, "DROP TRIGGER refuse ON requests")
        deadline = time.monotonic() + 30
        while httpx.get(f"{gateway.base_url}/readyz", timeout=10).json()["ledger_pending_rows"]:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.1)
        assert httpx.get(f"{gateway.base_url}/readyz", timeout=10).json()["ledger"] == "reachable"
    finally:
        gateway.kill_all()
    rows = postgres_server.psql(name, "SELECT request_id FROM requests").split()
    assert sorted(rows) == sorted(f"refused-{i}" for i in range(8))
