"""The usage ledger writer: rows are queued on the hot path and group-committed off it.

`append` only puts a tuple in a list. A background task commits the list in one
transaction every `flush_seconds` (or sooner once `batch_rows` are waiting). Shutdown
flushes everything; a SIGKILL loses at most the rows of one window, which
`tests/test_ledger_durability.py` measures.

Exactly once: a commit that fails may still have been applied (the connection died
while COMMIT's answer was on its way, or while the pool took the connection back), so a
failed batch is kept as *uncertain*. Before it is written again, the ledger is asked
whether its first row is there (a batch is one transaction: all of it or none is);
if it is, the batch counts as committed and is not written twice.

Outages: a second task, apart from the commits (one may wait on a lock held elsewhere or
on a server that stopped answering far longer than a flush interval), wakes every
`flush_seconds`. It tells `on_pending` (the gauge `metergate_ledger_pending_rows`) how many
rows are not committed yet, and once commits have failed or hung for `spool_after`
seconds, it moves the rows held to the local spool (`metering.spool`) whenever the oldest of
them has waited that long. So do the rows still held when the gateway stops while the
database is unreachable. A SIGKILL in an outage therefore loses at most the rows of the
last `spool_after` seconds and one `flush_seconds`, however long a commit hangs.

The batch of a commit under way goes into that file too, as a line of its own (each line
of a spool file is one batch). The file stays locked until the commit has ended, so no
replay asks whether the batch is in the ledger while it may still be committed; then the
writer keeps no copy of it, and its replay, like every replay, writes a batch only when its
first row is not in the ledger: written by the commit (which succeeded after all) or by the
replay, never by both. `flush` replays this process's spool before anything newer, and
again whatever was spooled while it committed, so after a flush every row appended so far
is in the ledger, as the budget rebuilds expect.

Each batch also adds its sums by hour (`metering.hourly`) in the same
transaction, so what budgets and the console sum there is what the rows say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from metergate.logs import RepeatedFailures
from metergate.metering.hourly import sum_statements
from metergate.metering.ledger_row import LedgerRow as LedgerRow
from metergate.metering.spool import Spool, SpoolFileError
from metergate.storage.database import Database

log = logging.getLogger("metergate.ledger")


COLUMNS = LedgerRow._fields
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


class _Commit:
    """One batch from memory on its way to the ledger: a transaction under way."""

    __slots__ = ("done", "lock", "ok", "path", "rows", "since", "spooling")

    def __init__(self, since: float, rows: list[LedgerRow]) -> None:
        self.since = since  # when its oldest row was appended (monotonic)
        self.rows = rows
        self.done = False
        self.ok = False
        self.spooling = False  # a spool file with it in is being written
        self.path: Path | None = None  # the spool file that holds it too
        self.lock: int | None = None  # that file's lock, held until the commit has ended


class LedgerWriter:
    def __init__(
        self,
        database: Database,
        *,
        flush_seconds: float = 0.2,
        batch_rows: int = 1000,
        on_pending: Callable[[int], None] | None = None,
        spool: Spool | None = None,
        spool_after: float = 5.0,
    ) -> None:
        self.database = database
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.spool = spool
        self.spool_after = spool_after
        self._spooled: dict[Path, int] = {}  # this process's spool files and their rows
        self._spooling = asyncio.Lock()  # held while rows are written to a spool file
        self._in_spool_write = 0  # rows out of memory, their spool file being written
        self._failing_since: float | None = None
        self._writing_since: float | None = None  # when the commit under way began
        self._pending: list[LedgerRow] = []
        self._pending_since = 0.0  # when the oldest of `_pending` was appended
        # batches whose commit failed (applied?), each with its oldest row's time
        self._uncertain: list[tuple[float, list[LedgerRow]]] = []
        self._commit: _Commit | None = None  # the batch of the commit under way
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._on_pending = on_pending or (lambda n: None)
        self.committed = 0
        # why the spool cannot be written now (a full or read-only disk): the rows it
        # should hold are in memory only, lost if the process dies (`/readyz` says so)
        self.spool_failing: str | None = None
        self._spool_failures = RepeatedFailures(
            log, "writing ledger rows to the spool", "they are kept in memory"
        )
        self._commit_failures = RepeatedFailures(log, "ledger commit", "its rows are kept")

    def append(self, row: LedgerRow) -> None:
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(row)
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    @property
    def held(self) -> int:
        """Rows in memory (a commit under way has some), not yet known to be committed."""
        commit = self._commit
        in_memory = commit is not None and commit.path is None and not commit.spooling
        under_way = len(commit.rows) if commit is not None and in_memory else 0
        return sum(len(batch) for _, batch in self._uncertain) + len(self._pending) + under_way

    @property
    def pending(self) -> int:
        """Rows not yet in the ledger: held in memory or waiting in this process's spool
        (or on their way there)."""
        return self.held + self._in_spool_write + sum(self._spooled.values())

    @property
    def failing_for(self) -> float | None:
        """Seconds since commits began to fail, or since the commit under way began once
        it has hung for `spool_after` (None while they succeed)."""
        since = self._trouble_since()
        return None if since is None else time.monotonic() - since

    def _trouble_since(self) -> float | None:
        """When commits began to fail, or the one under way began if it has hung so long
        that its rows would spool (a lock held elsewhere, a server that stopped answering)."""
        if self._failing_since is not None:
            return self._failing_since
        writing = self._writing_since
        if writing is not None and time.monotonic() - writing >= self.spool_after:
            return writing
        return None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        self._watcher = asyncio.create_task(self._watch(), name="ledger-watcher")

    async def close(self) -> None:
        """Let the background task finish its commit, then commit every row still held;
        when the database refuses them for `spool_after` seconds, spool them. Rows that
        wait that long in a commit that hangs are spooled meanwhile, as they are while
        the gateway runs.

        The task is not cancelled: a commit cut off mid-way could be applied by the
        database yet look failed here, and be written twice.
        """
        self._closing = True
        self._wake.set()
        try:
            await self._close()
        finally:
            self._closed.set()
            if self._watcher is not None:
                await self._watcher
                self._watcher = None

    async def _close(self) -> None:
        if self._task is not None:
            await self._task
            self._task = None
        # A database already failing is not waited for again: its rows go to the spool.
        patience = 0.0 if self._failing_since is not None else self.spool_after
        deadline = time.monotonic() + patience
        while self.pending or self._spooled:
            try:
                await self.flush()
            except Exception:
                if self.spool is None:
                    raise
                if not self.held:
                    log.error("ledger unreachable: %d rows stay spooled", self.pending)
                    return
                if time.monotonic() < deadline:
                    log.warning("ledger commit failed at shutdown; retrying", exc_info=True)
                    await asyncio.sleep(min(0.5, self.spool_after / 4))
                    continue
                async with self._flushing:
                    await self._spool_held()
                if self.held:
                    log.error("%d ledger rows are lost: neither committed nor spooled", self.held)
                return

    async def flush(self) -> None:
        """Commit every row appended so far, those a flush under way has taken too (the
        shared budget counters read the ledger after this and count on finding them),
        and those spooled meanwhile."""
        async with self._flushing:
            taken = False  # the rows appended since are for the next flush
            while True:
                async with self._spooling:  # rows being spooled: wait for their file
                    pass
                if self._spooled:  # older than anything held
                    await self._replay(next(iter(self._spooled)))
                elif self._uncertain:
                    since, batch = self._uncertain.pop(0)
                    await self._commit_batch(since, batch, uncertain=True)
                elif self._pending and not taken:
                    taken = True
                    since, batch, self._pending = self._pending_since, self._pending, []
                    await self._commit_batch(since, batch, uncertain=False)
                else:
                    return

    def adopt_spool(self) -> None:
        """Take on every spool file in the directory, those of earlier runs and other
        processes too: the next flush writes them (at start, before budgets read)."""
        if self.spool is not None:
            for path, rows in self.spool.waiting().items():
                self._spooled.setdefault(path, rows)

    async def _replay(self, path: Path) -> None:
        assert self.spool is not None

        async def insert_missing(batch: list[LedgerRow]) -> int:
            self._writing_since = time.monotonic()  # a big file is many commits
            return await self._insert_missing(batch)

        self._writing_since = time.monotonic()
        try:
            inserted = await self.spool.replay(path, insert_missing)
        except SpoolFileError:
            log.exception("ledger spool file %s left out", path)
            inserted = None
        finally:
            self._writing_since = None
        del self._spooled[path]
        if inserted is not None:
            self.committed += inserted
            log.warning("ledger spool %s replayed: %d rows written", path, inserted)
        self._on_pending(self.pending)

    async def _insert_missing(self, batch: list[LedgerRow]) -> int:
        """Insert a batch unless its commit already happened (all or nothing)."""
        if await self._stored(batch[0]):
            return 0
        await self._write(batch)
        return len(batch)

    async def _write(self, batch: list[LedgerRow]) -> None:
        """Insert a batch and add its sums by hour: one transaction."""
        await self.database.write([(_INSERT, batch), *sum_statements(self.database.dialect, batch)])

    async def _commit_batch(self, since: float, batch: list[LedgerRow], uncertain: bool) -> None:
        """Write a batch from memory; an uncertain one only if it is not in the ledger yet.

        Its rows may be spooled while the commit is under way (`_spool_held`); the spool
        file's replay then finds the batch in the ledger if this commit succeeds, and
        writes it if it fails, and this writer keeps no copy of it."""
        commit = _Commit(since, batch)
        self._commit = commit
        self._writing_since = time.monotonic()
        try:
            if uncertain:
                await self._insert_missing(batch)
            else:
                await self._write(batch)
            commit.ok = True
        finally:  # cancelled too: then it is uncertain
            self._commit = None
            self._writing_since = None
            commit.done = True
            if commit.ok:
                self.committed += len(batch)
            if not commit.spooling:  # else that spool settles it once its file is written
                self._settle(commit)
        self._on_pending(self.pending)

    def _settle(self, commit: _Commit) -> None:
        """A commit has ended (and no spool file with its rows is being written)."""
        if commit.path is not None:  # a spool file holds it: its replay checks for it
            if commit.ok and commit.path in self._spooled:
                self._spooled[commit.path] -= len(commit.rows)
            if commit.lock is not None:
                Spool.release(commit.lock)
                commit.lock = None
        elif not commit.ok:  # retried, or found committed, before newer rows
            self._uncertain.insert(0, (commit.since, commit.rows))

    async def _spool_held(self) -> None:
        """Move every row held in memory to a new spool file, with the batch of a commit
        under way: that file stays locked until the commit has ended."""
        assert self.spool is not None
        async with self._spooling:
            commit = self._commit
            if commit is not None and commit.path is not None:
                commit = None  # in a spool file already
            uncertain = self._uncertain
            if self._pending:
                uncertain = [*uncertain, (self._pending_since, self._pending)]
            batches = [*([commit.rows] if commit else []), *(batch for _, batch in uncertain)]
            if not batches:
                return
            self._uncertain, self._pending = [], []
            rows = sum(map(len, batches))
            self._in_spool_write = rows
            if commit is not None:
                commit.spooling = True
            written: tuple[Path, int | None] | None = None
            try:
                if commit is not None:
                    written = await asyncio.to_thread(self.spool.write_held, batches)
                else:
                    written = await asyncio.to_thread(self.spool.write, batches), None
            except Exception as error:  # a full or read-only disk, mostly
                self.spool_failing = f"{type(error).__name__}: {error}"
                self._spool_failures.failed(error)
            else:
                self.spool_failing = None
                self._spool_failures.succeeded()
            finally:
                self._in_spool_write = 0
                if written is None:  # each batch still all or nothing, oldest first
                    self._uncertain[:0] = uncertain
                else:
                    path = written[0]
                    self._spooled[path] = rows
                    log.error("ledger database unreachable: %d rows spooled to %s", rows, path)
                if commit is not None:
                    commit.spooling = False
                    if written is not None:
                        commit.path, commit.lock = written
                    if commit.done:
                        self._settle(commit)

    async def _stored(self, row: LedgerRow) -> bool:
        """Is this row in the ledger? (ts and request id tell rows apart; ts is indexed.)"""
        found = await self.database.fetch(
            "SELECT 1 FROM requests WHERE ts = ? AND request_id = ? AND key_name = ?",
            (row.ts, row.request_id, row.key_name),
        )
        return bool(found)

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
            self._wake.clear()
            began = time.monotonic()
            try:
                await self.flush()
                self._failing_since = None
                self._commit_failures.succeeded()
            except Exception as error:
                self._commit_failures.failed(error)
                if self._failing_since is None:  # since it began: it may have hung first
                    self._failing_since = began
                await asyncio.sleep(min(5.0, self.flush_seconds * 10))

    async def _watch(self) -> None:
        """Every flush interval, whatever a commit is doing (it may wait on a lock or an
        unanswered server far longer): export how many rows are not committed yet, and
        spool the rows held once they have waited `spool_after` in trouble."""
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.flush_seconds)
            try:
                if self._due_for_spool():
                    await self._spool_held()
            except Exception:
                log.exception("ledger rows not spooled")
            self._on_pending(self.pending)

    def _due_for_spool(self) -> bool:
        """Commits have failed or hung for `spool_after`, and the oldest row held has
        waited that long (so rows go to disk once per `spool_after`, not every tick)."""
        if self.spool is None or self._spooling.locked():
            return False
        trouble = self._trouble_since()
        if trouble is None:
            return False
        times = [since for since, _ in self._uncertain]
        if self._pending:
            times.append(self._pending_since)
        commit = self._commit
        if commit is not None and commit.path is None:
            times.append(commit.since)
        now = time.monotonic()
        return bool(times) and now - min(times) >= self.spool_after
