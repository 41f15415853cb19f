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

Outages: rows the database has refused for `spool_after` seconds go to the local spool
(`metering.spool`), and so do the rows still held when the gateway stops while the
database is unreachable. `flush` replays this process's spool before anything newer, so
after a flush every row appended so far is in the ledger, as the budget rebuilds expect.

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

from metergate.metering.hourly import sum_statements
from metergate.metering.ledger_row import LedgerRow as LedgerRow
from metergate.metering.spool import Spool, SpoolFileError
from metergate.storage.database import Database

log = logging.getLogger("metergate.ledger")


COLUMNS = LedgerRow._fields
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


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
        self._failing_since: float | None = None
        self._pending: list[LedgerRow] = []
        self._uncertain: list[list[LedgerRow]] = []  # batches whose commit failed: applied?
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_pending = on_pending or (lambda n: None)
        self.committed = 0

    def append(self, row: LedgerRow) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    @property
    def held(self) -> int:
        """Rows in memory, not yet known to be committed."""
        return sum(map(len, self._uncertain)) + len(self._pending)

    @property
    def pending(self) -> int:
        """Rows not yet in the ledger: held in memory or waiting in this process's spool."""
        return self.held + sum(self._spooled.values())

    @property
    def failing_for(self) -> float | None:
        """Seconds since commits began to fail (None while they succeed)."""
        since = self._failing_since
        return None if since is None else time.monotonic() - since

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Let the background task finish its commit, then commit every row still held;
        when the database refuses them for `spool_after` seconds, spool them.

        The task is not cancelled: a commit cut off mid-way could be applied by the
        database yet look failed here, and be written twice.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        # A database already failing is not waited for again: its rows go to the spool.
        patience = 0.0 if self._failing_since is not None else self.spool_after
        deadline = time.monotonic() + patience
        while self.pending:
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
        shared budget counters read the ledger after this and count on finding them)."""
        async with self._flushing:
            while self._spooled:  # older than anything held
                await self._replay(next(iter(self._spooled)))
            await self._flush()

    def adopt_spool(self) -> None:
        """Take on every spool file in the directory, those of earlier runs and other
        processes too: the next flush writes them (at start, before budgets read)."""
        if self.spool is not None:
            for path, rows in self.spool.waiting().items():
                self._spooled.setdefault(path, rows)

    async def _replay(self, path: Path) -> None:
        assert self.spool is not None
        try:
            inserted = await self.spool.replay(path, self._insert_missing)
        except SpoolFileError:
            log.exception("ledger spool file %s left out", path)
            inserted = None
        del self._spooled[path]
        if inserted is not None:
            self.committed += inserted
            log.warning("ledger spool %s replayed: %d rows written", path, inserted)

    async def _insert_missing(self, batch: list[LedgerRow]) -> int:
        """Insert a batch unless its commit already happened (all or nothing)."""
        if await self._stored(batch[0]):
            return 0
        await self._write(batch)
        return len(batch)

    async def _write(self, batch: list[LedgerRow]) -> None:
        """Insert a batch and add its sums by hour: one transaction."""
        await self.database.write([(_INSERT, batch), *sum_statements(self.database.dialect, batch)])

    async def _spool_held(self) -> None:
        """Move every row held in memory to a new spool file (under `_flushing`)."""
        assert self.spool is not None
        batches = [*self._uncertain, *([self._pending] if self._pending else [])]
        if not batches:
            return
        self._uncertain, self._pending = [], []
        try:
            path = await asyncio.to_thread(self.spool.write, batches)
        except Exception:  # a full or read-only disk, mostly
            log.exception("could not spool ledger rows; %d kept in memory", self.held)
            self._uncertain[:0] = batches  # each still all or nothing, oldest first
            return
        rows = sum(map(len, batches))
        self._spooled[path] = rows
        log.error("ledger database unreachable: %d rows spooled to %s", rows, path)

    async def _flush(self) -> None:
        while self._uncertain:  # each batch is taken by one flush at a time
            batch = self._uncertain.pop(0)
            try:
                await self._insert_missing(batch)
            except Exception:
                self._uncertain.insert(0, batch)
                raise
            self.committed += len(batch)
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._write(batch)
        except Exception:
            self._uncertain.append(batch)  # retried, or found committed, before newer rows
            raise
        self.committed += len(batch)
        self._on_pending(self.pending)

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
            self._on_pending(self.pending)
            try:
                await self.flush()
                self._failing_since = None
            except Exception:
                log.exception("ledger commit failed; %d rows kept for retry", self.pending)
                await self._spool_if_failing()
                await asyncio.sleep(min(5.0, self.flush_seconds * 10))

    async def _spool_if_failing(self) -> None:
        """Spool the rows held once commits have failed for `spool_after` seconds."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if self.spool is not None and now - self._failing_since >= self.spool_after:
            async with self._flushing:
                await self._spool_held()
            self._on_pending(self.pending)
