"""How many ledger rows per second metergate's `LedgerWriter` commits, on SQLite and on
PostgreSQL, in this process (the gateway's own writer, not a copy).

Rows are appended in bursts of `burst` as a busy gateway would (the writer wakes every
`batch_rows`, or every 0.2 s), the loop yields between bursts so the writer commits
while rows keep coming, and the clock stops when `close()` has committed the last one.
The result is the sustained capacity of one gateway process's ledger: above it, pending
rows would grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metergate.metering.ledger import LedgerRow, LedgerWriter
from metergate.storage.database import open_database

REPO = Path(__file__).resolve().parents[2]
KEYS = 100  # the keys the rows come from


@dataclass(frozen=True)
class LedgerRate:
    backend: str
    rows: int
    seconds: float
    max_pending: int
    commits: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def _row(index: int, now: float, prefix: str = "req_bench") -> LedgerRow:
    return LedgerRow(
        now,
        f"{prefix}{index:012x}",
        f"bench-{index % KEYS}",  # a batch adds a sum by hour for each of its keys
        "bench",
        "bench-upstream",
        1,
        11,
        0,
        7,
        25_000,
        0,
        0.4,
        None,
        "success",
        200,
        0,
        0,
    )


async def measure(
    url: str, backend: str, rows: int, burst: int = 100, prefix: str = "req_bench"
) -> LedgerRate:
    database = await open_database(url)
    commits = 0
    try:
        writer = LedgerWriter(database)
        original = database.write

        async def counted(statements: Any) -> None:
            nonlocal commits
            commits += 1
            await original(statements)

        database.write = counted  # type: ignore[method-assign]
        await writer.start()
        now = time.time()
        max_pending = 0
        started = time.perf_counter()
        for index in range(rows):
            writer.append(_row(index, now, prefix))
            if index % burst == burst - 1:
                max_pending = max(max_pending, writer.pending)
                await asyncio.sleep(0)
        await writer.close()
        seconds = time.perf_counter() - started
        if writer.committed != rows:
            raise RuntimeError(f"{backend}: committed {writer.committed} of {rows} rows")
        return LedgerRate(backend, rows, seconds, max_pending, commits)
    finally:
        await database.close()


def sqlite(rows: int) -> LedgerRate:
    with tempfile.TemporaryDirectory(prefix="metergate-ledger-") as tmp:
        return asyncio.run(measure(f"sqlite:///{tmp}/ledger.db", "SQLite (WAL)", rows))


def _writer_process(url: str, rows: int, prefix: str, start: Any, out: Any) -> None:
    """One of `sqlite_processes`' writers (a spawned process): wait, write, report."""
    start.wait()
    result = asyncio.run(measure(url, "SQLite", rows, prefix=prefix))
    out.put((result.max_pending, result.commits))


def sqlite_processes(rows: int, processes: int) -> LedgerRate:
    """`processes` LedgerWriters in as many processes, one SQLite file, `rows` in all: what
    gateway workers sharing a SQLite ledger can commit together (each process has its own
    connection; SQLite lets one write at a time, the others wait in its busy handler)."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="metergate-ledger-") as tmp:
        url = f"sqlite:///{tmp}/ledger.db"
        asyncio.run(_migrate(url))  # once, before the clock: not what is measured
        start, out = context.Barrier(processes + 1), context.Queue()
        share = rows // processes
        children = [
            context.Process(target=_writer_process, args=(url, share, f"req_p{index}_", start, out))
            for index in range(processes)
        ]
        for child in children:
            child.start()
        try:
            start.wait(timeout=120)
            began = time.perf_counter()
            for child in children:
                child.join(timeout=600)
            seconds = time.perf_counter() - began
            if any(child.exitcode != 0 for child in children):
                raise RuntimeError(
                    f"a ledger writer process failed: {[c.exitcode for c in children]}"
                )
            reports = [out.get(timeout=10) for _ in children]
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
        return LedgerRate(
            f"SQLite (WAL), {processes} processes on one file",
            share * processes,
            seconds,
            max(r[0] for r in reports),
            sum(r[1] for r in reports),
        )


async def _migrate(url: str) -> None:
    database = await open_database(url)
    await database.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[str | None]:
    """A throwaway PostgreSQL on 127.0.0.1 (tests/services.py's, as the tests start it),
    yielding its URL, or None when PostgreSQL is not installed."""
    sys.path.insert(0, str(REPO))
    try:
        from tests.services import PostgresServer, _postgres_bindir
    finally:
        sys.path.remove(str(REPO))
    bindir = _postgres_bindir()
    if bindir is None:
        yield None
        return
    try:
        server = PostgresServer(bindir)
    except BaseException as skipped:  # pytest.skip() (a BaseException): no `postgres` user
        if isinstance(skipped, KeyboardInterrupt | SystemExit):
            raise
        print(f"PostgreSQL not usable: {skipped}", file=sys.stderr)
        yield None
        return
    try:
        server.start()
        yield server.create_database("ledger_bench")
    finally:
        server.stop()


def postgresql(rows: int) -> tuple[LedgerRate | None, str]:
    """(result, PostgreSQL version or why it did not run)."""
    with postgres_server() as url:
        if url is None:
            return None, "not installed"
        result = asyncio.run(measure(url, "PostgreSQL", rows))
        version = asyncio.run(_server_version(url))
        return result, version


async def _server_version(url: str) -> str:
    database = await open_database(url)
    try:
        rows = await database.fetch("SHOW server_version")
        return f"PostgreSQL {rows[0][0]}"
    finally:
        await database.close()
