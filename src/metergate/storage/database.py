"""One small async interface over SQLite (aiosqlite) and PostgreSQL (asyncpg).

Statements are written once with `?` placeholders; the PostgreSQL side rewrites them to
`$1, $2, ...`. Opening a database applies any pending schema migrations.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import math
import os
import re
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]

DEFAULT_TIMEOUT = 10.0  # seconds; `ledger.timeout_seconds`
REPORT_CONNECTIONS = 2  # PostgreSQL connections for the console's reports
# seconds a report's statement may run on PostgreSQL: a month of a busy ledger takes
# tens of seconds, and a report holds up nothing but the console page that asked for it.
# Only while the server answers, though: past `ledger.timeout_seconds` the server is
# asked `SELECT 1` on the ledger's own pool, and a report on a hung server gives up
# with it (`PostgresDatabase._watched`).
REPORT_TIMEOUT = 60.0
_MIGRATING = 24 * 3600.0  # a migration (or the wait for another process's) may take long

# PostgreSQL advisory lock held while one process migrates at open. Not the key that
# `migrations` takes per migration: the same key on a second connection would deadlock.
_OPEN_LOCK_KEY = 0x6D676F70  # "mgop"


class UniqueViolation(Exception):
    """A write broke a unique constraint (another writer got there first)."""


class Transaction(abc.ABC):
    """Statements that commit together or not at all: a check and the write it allows
    (SQLite: `BEGIN IMMEDIATE`, the one write lock, so other processes wait; PostgreSQL:
    READ COMMITTED, with rows locked by `lock_rows`)."""

    dialect: Dialect

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return how many rows it changed."""

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def lock_rows(self, mode: Literal["SHARE", "UPDATE"]) -> str:
        """The suffix of a SELECT that locks the rows it reads until the transaction ends
        (nothing on SQLite, where the transaction already holds the database's write lock)."""
        return f" FOR {mode}" if self.dialect == "postgresql" else ""

    async def take_turns(self, key: int) -> None:
        """Wait until no other transaction that took `key` is open, and keep it until this
        one ends (nothing to do on SQLite, whose transactions all take turns already)."""


class Database(abc.ABC):
    dialect: Dialect

    def file_gone(self) -> str | None:
        """Why the database's file is no longer the one it writes to (a SQLite file
        deleted, or replaced, since it was opened): rows then go where no process will
        read them. None when it is, or the database is no file."""
        return None

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for many rows in a single transaction (group commit)."""
        await self.write([(sql, rows)])

    @abc.abstractmethod
    async def write(self, statements: Sequence[tuple[str, Iterable[Sequence[Any]]]]) -> None:
        """Run each statement for each of its rows, all in one transaction: a batch of
        ledger rows and the sums they add commit together or not at all."""

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abc.abstractmethod
    async def script(self, statements: Sequence[str], lock_key: int) -> None:
        """Run statements in one transaction that excludes other processes doing the same."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def reports(self) -> Database:
        """Where the console's reports (long read-only queries over many rows) run: apart
        from the connections the ledger writes on and requests read from (stored
        responses), so a report over a month of rows holds up neither. Opened on first
        use, closed with this database."""
        return self

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A transaction: committed when the block ends, rolled back when it raises.
        A unique constraint broken inside raises `UniqueViolation` out of the block."""
        raise NotImplementedError(f"{type(self).__name__} has no transactions")


_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
# SQLite failures of the file or its lock, not of the statement.
_SQLITE_UNREACHABLE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
)


def unreachable(error: BaseException) -> bool:
    """Did a call fail because the database could not be reached or used (down, gone from
    the network, out of connections or disk, locked past the busy timeout) rather than
    because of what was asked? Callers can then say "try again", not "bug"."""
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True  # refused, reset, timed out, name not found
    if isinstance(error, OSError):
        return error.errno in _NO_ROUTE
    if isinstance(error, sqlite3.Error):
        return str(getattr(error, "sqlite_errorname", "")).startswith(_SQLITE_UNREACHABLE)
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return False
    kinds = asyncpg.exceptions
    return isinstance(
        error,
        (
            kinds.PostgresConnectionError,
            kinds.OperatorInterventionError,  # shutting down, cannot connect now
            kinds.InsufficientResourcesError,  # too many connections, disk full
            kinds.InterfaceError,  # the connection was closed under the call
        ),
    )


def _null(value: None) -> None:
    return None


# sqlite3 binds int, float, str and bytes directly but sends every other value, None
# too, through its adaptation protocol, whose failed `__adapt__`/`__conform__` lookups
# each format an AttributeError: ~3,000 instructions per NULL, three per ledger row
# (bench/instructions.py). A registered adapter is found first; NULL is still bound.
sqlite3.register_adapter(type(None), _null)


class _SQLiteTransaction(Transaction):
    dialect = "sqlite"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        return int(cursor.rowcount)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._conn.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]


class _PostgresTransaction(Transaction):
    dialect = "postgresql"

    def __init__(self, conn: Any, sql: Any) -> None:
        self._conn = conn
        self._sql = sql

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status = await self._conn.execute(self._sql(sql), *params)
        count = str(status).rsplit(" ", 1)[-1]  # "UPDATE 1", "INSERT 0 1", "DELETE 0"
        return int(count) if count.isdigit() else 0

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(row) for row in await self._conn.fetch(self._sql(sql), *params)]

    async def take_turns(self, key: int) -> None:
        await self._conn.execute("SELECT pg_advisory_xact_lock($1)", key)


class SQLiteDatabase(Database):
    """One connection, so statements take turns: a transaction spans several awaits, and
    another task's statement run in between would join it (and be rolled back with it)
    or fail with "cannot start a transaction within a transaction"."""

    dialect = "sqlite"

    def __init__(self, path: str, query_only: bool = False) -> None:
        self.path = path
        self.query_only = query_only
        self._inode: int | None = None  # the file's, once opened
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._reader: SQLiteDatabase | None = None
        self._opening = asyncio.Lock()

    async def connect(self) -> None:
        import aiosqlite

        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        if self.path != ":memory:":
            self._inode = os.stat(self.path).st_ino
        await self._conn.execute("PRAGMA busy_timeout=30000")
        if self.query_only:  # the file is in WAL mode already: readers do not block writers
            await self._conn.execute("PRAGMA query_only=ON")
            return
        # Switching a new file to WAL needs an exclusive lock and does not wait on the busy
        # handler: processes opening the same new file together retry for a while.
        for attempt in range(200):
            try:
                await self._conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == 199:
                    raise
                await asyncio.sleep(0.05)
        await self._conn.execute("PRAGMA synchronous=NORMAL")
        await self._math_functions()

    def file_gone(self) -> str | None:
        if self._inode is None:
            return None
        try:
            found = os.stat(self.path).st_ino
        except FileNotFoundError:
            return f"its file {self.path} was deleted or moved since it was opened"
        if found != self._inode:
            return f"its file {self.path} was replaced since it was opened"
        return None

    async def _math_functions(self) -> None:
        """LN and FLOOR, which a migration uses (`storage.migrations`), from Python where
        the SQLite library was built without its math functions."""
        try:
            await self._conn.execute("SELECT LN(2), FLOOR(2.5)")
        except sqlite3.OperationalError:
            await self._conn.create_function("LN", 1, math.log, deterministic=True)
            await self._conn.create_function("FLOOR", 1, math.floor, deterministic=True)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with self._lock:
            await self._conn.execute(sql, params)

    async def write(self, statements: Sequence[tuple[str, Iterable[Sequence[Any]]]]) -> None:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    await self._conn.executemany(sql, rows)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._lock, self._conn.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def script(self, statements: Sequence[str], lock_key: int) -> None:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")  # takes SQLite's single write lock
            try:
                for statement in statements:
                    await self._conn.execute(statement)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteTransaction(self._conn)
            except BaseException as error:
                await self._conn.execute("ROLLBACK")
                if isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error):
                    raise UniqueViolation(str(error)) from error
                raise
            await self._conn.execute("COMMIT")

    async def reports(self) -> Database:
        """A second connection (SQLite runs one statement at a time per connection), in
        its own thread; an in-memory database has only the one."""
        if self.path == ":memory:" or self.query_only:
            return self
        async with self._opening:
            if self._reader is None:
                reader = SQLiteDatabase(self.path, query_only=True)
                await reader.connect()
                self._reader = reader
        return self._reader

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None


class PostgresDatabase(Database):
    """A pool whose connection attempts and statements give up after `timeout` seconds:
    a server that stops answering (a hung host, a network dropping packets) otherwise
    holds a call for minutes, and cancelling it waits on that server too."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        connections: int = 4,
        statement_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.connections = connections
        self.statement_timeout = timeout if statement_timeout is None else statement_timeout
        self._pool: Any = None
        self._sql_cache: dict[str, str] = {}
        # for a pool of reports: the database whose pool it is, asked if the server lives
        self._ledger: PostgresDatabase | None = None
        self._reports: PostgresDatabase | None = None
        self._opening = asyncio.Lock()

    async def connect(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=self.connections,
            timeout=self.timeout,
            command_timeout=self.statement_timeout,
        )

    def _sql(self, sql: str) -> str:
        converted = self._sql_cache.get(sql)
        if converted is None:
            counter = iter(range(1, 10_000))
            converted = re.sub(r"\?", lambda _: f"${next(counter)}", sql)
            self._sql_cache[sql] = converted
        return converted

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._pool.execute(self._sql(sql), *params)

    async def write(self, statements: Sequence[tuple[str, Iterable[Sequence[Any]]]]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            for sql, rows in statements:
                await conn.executemany(self._sql(sql), list(rows))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if self._ledger is not None:
            return await self._watched(self._sql(sql), params, self._ledger)
        return [tuple(row) for row in await self._pool.fetch(self._sql(sql), *params)]

    async def _watched(
        self, sql: str, params: Sequence[Any], ledger: PostgresDatabase
    ) -> list[Row]:
        """A report's statement, which may run for `REPORT_TIMEOUT` while the server
        answers: every `timeout` seconds it runs, the ledger's pool asks `SELECT 1`
        (itself bounded by `timeout`). A hung host (frozen, its packets dropped) fails
        that, and the report gives up with the same unreachable error, in about twice
        `timeout` instead of a minute for each statement of the page."""
        async with self._pool.acquire() as conn:
            query = asyncio.ensure_future(conn.fetch(sql, *params))
            try:
                while True:
                    done, _ = await asyncio.wait((query,), timeout=self.timeout)
                    if done:
                        return [tuple(row) for row in query.result()]
                    await ledger.fetch("SELECT 1")
            except BaseException as error:
                if not query.done():
                    if unreachable(error):  # a cancel would wait on the hung server
                        conn.terminate()
                    query.cancel()  # the page went away: the server stops the statement
                    with contextlib.suppress(BaseException):
                        await query
                raise

    async def script(self, statements: Sequence[str], lock_key: int) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key, timeout=_MIGRATING)
            for statement in statements:
                await conn.execute(statement, timeout=_MIGRATING)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        import asyncpg

        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield _PostgresTransaction(conn, self._sql)
        except asyncpg.UniqueViolationError as error:
            raise UniqueViolation(str(error)) from error

    async def reports(self) -> Database:
        """A pool of its own (of 2), so reports cannot take the connections the ledger
        writer and the requests need; its statements may run for `REPORT_TIMEOUT`."""
        if self._ledger is not None:
            return self
        async with self._opening:
            if self._reports is None:
                reports = PostgresDatabase(
                    self.url,
                    self.timeout,
                    REPORT_CONNECTIONS,
                    max(self.statement_timeout, REPORT_TIMEOUT),
                )
                reports._ledger = self
                await reports.connect()
                self._reports = reports
        return self._reports

    async def close(self) -> None:
        """Close gracefully, or drop the connections of a server that does not answer."""
        if self._reports is not None:
            await self._reports.close()
            self._reports = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.timeout)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    async def migrate_exclusively(self) -> None:
        """Migrate while holding a session lock, so processes opening together take turns.

        Even `CREATE TABLE IF NOT EXISTS` fails when two sessions run it at once (a unique
        violation on pg_type), so the whole migration, not only each step, is serialized.
        """
        from metergate.storage.migrations import migrate

        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _OPEN_LOCK_KEY, timeout=_MIGRATING)
            try:
                await migrate(self)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _OPEN_LOCK_KEY)


def sqlite_path(url: str) -> str | None:
    """The file of a `sqlite://` URL (None for another database): `sqlite:///ledger.db` is
    relative to the working directory, `sqlite:////var/lib/ledger.db` absolute."""
    if not url.startswith("sqlite://"):
        return None
    path = url.removeprefix("sqlite://")
    return (path[1:] if path.startswith("/") else path) or ":memory:"


async def open_database(url: str, answer_within: float = DEFAULT_TIMEOUT) -> Database:
    """Connect to `sqlite:///path` or `postgresql://...` and bring the schema up to date.
    `answer_within`: seconds PostgreSQL may leave a connect or a statement unanswered."""
    from metergate.storage.migrations import migrate

    database: SQLiteDatabase | PostgresDatabase
    path = sqlite_path(url)
    if path is not None:
        database = SQLiteDatabase(path)
    else:
        database = PostgresDatabase(url, answer_within)
    await database.connect()
    try:
        if isinstance(database, PostgresDatabase):
            await database.migrate_exclusively()
        else:
            await migrate(database)
    except BaseException:
        await database.close()
        raise
    return database
