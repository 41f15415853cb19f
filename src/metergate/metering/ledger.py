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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from metergate.storage.database import Database

log = logging.getLogger("metergate.ledger")


class LedgerRow(NamedTuple):
    """One request as the ledger stores it (a tuple: inserted without conversion)."""

    ts: float
    request_id: str
    key_name: str
    model: str
    upstream: str
    attempts: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nano: int
    saved_nano: int
    duration_ms: float
    ttft_ms: float | None
    outcome: str
    status: int
    cache_hit: int  # 0/1: INTEGER in both SQLite and PostgreSQL
    stream: int
    usage_estimated: int = 0  # 1: the tokens are the gateway's bound, not the upstream's count
    api: str = "chat"  # the door: chat, responses, messages, completions, embeddings
    team: str | None = None  # the key's team when the request was made
    tags: str | None = None  # JSON object of the request's tags (with defaults), or NULL


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
    ) -> None:
        self.database = database
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
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
    def pending(self) -> int:
        return sum(map(len, self._uncertain)) + len(self._pending)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Let the background task finish its commit, then commit every row still pending.

        The task is not cancelled: a commit cut off mid-way could be applied by the
        database yet look failed here, and be written twice.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self.pending:
            await self.flush()

    async def flush(self) -> None:
        """Commit every row appended so far, those a flush under way has taken too (the
        shared budget counters read the ledger after this and count on finding them)."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        while self._uncertain:  # each batch is taken by one flush at a time
            batch = self._uncertain.pop(0)
            try:
                if not await self._stored(batch[0]):
                    await self.database.executemany(_INSERT, batch)
            except Exception:
                self._uncertain.insert(0, batch)
                raise
            self.committed += len(batch)
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self.database.executemany(_INSERT, batch)
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
            except Exception:
                log.exception("ledger commit failed; %d rows kept for retry", self.pending)
                await asyncio.sleep(min(5.0, self.flush_seconds * 10))
